//! Lambda binary for `functions::my_devices`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "my-devices",
        common::Tokens::Used,
        functions::my_devices::handler,
    )
    .await
}
