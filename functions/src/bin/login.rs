//! Lambda binary for `functions::login`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http("login", common::Tokens::Used, functions::login::handler).await
}
