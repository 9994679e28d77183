//! Lambda binary for `functions::upload_prekeys`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "upload-prekeys",
        common::Tokens::Used,
        functions::upload_prekeys::handler,
    )
    .await
}
