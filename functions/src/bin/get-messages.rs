//! Lambda binary for `functions::get_messages`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "get-messages",
        common::Tokens::Used,
        functions::get_messages::handler,
    )
    .await
}
