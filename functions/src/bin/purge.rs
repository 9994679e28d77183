//! Lambda binary for the scheduled purge (EventBridge, hourly).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let state = common::runtime::init("purge").await?;
    lambda_runtime::run(service_fn(
        |event: LambdaEvent<EventBridgeEvent>| async move {
            let remaining = Duration::from_millis(event.context.deadline).saturating_sub(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default(),
            );
            let deadline = Instant::now() + remaining;
            functions::purge::purge(state, deadline, functions::purge::DEFAULT_BATCH_SIZE)
                .await
                .map_err(|error| {
                    tracing::error!(error = %error, "purge failed");
                    common::db::short_reason(&error)
                })
        },
    ))
    .await
}
