//! Lambda binary for `functions::me`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http("me", common::Tokens::Used, functions::me::handler).await
}
