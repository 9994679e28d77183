//! Lambda binary for `functions::create_link_code`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "create-link-code",
        common::Tokens::Used,
        functions::create_link_code::handler,
    )
    .await
}
