//! Lambda binary for `functions::send_to_devices`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "send-to-devices",
        common::Tokens::Used,
        functions::send_to_devices::handler,
    )
    .await
}
