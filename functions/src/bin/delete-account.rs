//! Lambda binary for `functions::delete_account`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http("delete-account", functions::delete_account::handler).await
}
