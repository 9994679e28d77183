//! Lambda binary for `functions::metrics`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "metrics",
        common::Tokens::Unused,
        functions::metrics::handler,
    )
    .await
}
