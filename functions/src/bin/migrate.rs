//! Applies the embedded migrations: a Lambda function in AWS, a one-shot command elsewhere.

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    common::telemetry::init();
    let db = functions::migrate::connect()?;
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_none() {
        let report = functions::migrate::run(&db).await?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let db: &'static _ = Box::leak(Box::new(db));
    lambda_runtime::run_concurrent(service_fn(move |_: LambdaEvent<Value>| async move {
        functions::migrate::run(db)
            .await
            .map_err(|error| error.to_string())
    }))
    .await
}
