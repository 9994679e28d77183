//! Creates the two database roles once, from inside the VPC (infra/README.md, step 3:
//! `make setup-roles`). Not an HTTP function and not routed; invoked by hand only.

use functions::setup_roles::{self, SetupRequest};
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    common::telemetry::init();
    lambda_runtime::run_concurrent(service_fn(|event: LambdaEvent<SetupRequest>| async move {
        let database = event.payload.database.clone();
        match setup_roles::run(event.payload).await {
            Ok(report) => {
                tracing::info!(database, "database roles are set up");
                Ok(report)
            }
            Err(error) => {
                tracing::error!(database, error = %error, "database role setup failed");
                Err(error.to_string())
            }
        }
    }))
    .await
}
