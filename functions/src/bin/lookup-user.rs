//! Lambda binary for `functions::lookup_user`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "lookup-user",
        common::Tokens::Used,
        functions::lookup_user::handler,
    )
    .await
}
