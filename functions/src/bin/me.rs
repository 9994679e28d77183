//! Lambda binary for `functions::me`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http("me", functions::me::handler).await
}
