//! Lambda binary for `functions::health`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http("health", common::Tokens::Unused, functions::health::handler).await
}
