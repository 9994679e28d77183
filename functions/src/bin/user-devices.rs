//! Lambda binary for `functions::user_devices`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "user-devices",
        common::Tokens::Used,
        functions::user_devices::handler,
    )
    .await
}
