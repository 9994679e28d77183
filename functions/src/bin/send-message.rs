//! Lambda binary for `functions::send_message`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "send-message",
        common::Tokens::Used,
        functions::send_message::handler,
    )
    .await
}
