//! Lambda binary for `functions::remove_device`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "remove-device",
        common::Tokens::Used,
        functions::remove_device::handler,
    )
    .await
}
