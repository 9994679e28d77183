//! Lambda binary for `functions::register`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "register",
        common::Tokens::Unused,
        functions::register::handler,
    )
    .await
}
