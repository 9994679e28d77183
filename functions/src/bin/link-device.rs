//! Lambda binary for `functions::link_device`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "link-device",
        common::Tokens::Unused,
        functions::link_device::handler,
    )
    .await
}
