//! The simulator speaks what fenx-sync reads: its webhooks verify and parse, its polled batches
//! parse, its entities decode. The simulator crate cannot check this itself (it must not depend
//! on fenx-sync), so the product's side checks it here.

use bytes::Bytes;
use fenx_sim::testkit::Api;
use fenx_sim::{SimConfig, Simulator};
use fenx_sync::fenergo::wire::Entity;
use fenx_sync::notification::{entity_id, parse_body};
use fenx_sync::signature::{RecipeChoice, Verifier};
use secrecy::SecretString;

#[tokio::test]
async fn fenx_sync_verifies_and_parses_what_the_simulator_sends() {
    let sim = Simulator::start(SimConfig::default()).await;
    let body = sim.notification("entitydata:draftverified", "abc");
    let signature = fenx_sim::sign("webhook-secret", body.as_bytes());
    let verifier = Verifier::new(&[SecretString::from("webhook-secret")], RecipeChoice::Auto);
    let verified = verifier.verify(Some(signature.as_bytes()), body.as_bytes());
    assert_eq!(verified.unwrap().recipe.to_string(), "sha256-hex/hex");

    let parsed = parse_body(&Bytes::from(body)).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(
        parsed[0].event_type.as_deref(),
        Some("entitydata:draftverified")
    );
    assert_eq!(
        entity_id(parsed[0].relative_url.as_deref().unwrap()),
        Some("abc")
    );

    sim.publish("entitydata:draftverified", "abc");
    sim.publish("journey:taskstarted", "def");
    let api = Api::new(&sim).await;
    let (status, batch) = api.next_batch("all").await;
    assert_eq!(status, 200, "{batch}");
    let polled = parse_body(&Bytes::from(batch.to_string())).unwrap();
    assert_eq!(polled.len(), 2);
    assert_eq!(polled[1].event_type.as_deref(), Some("journey:taskstarted"));
    assert_eq!(
        entity_id(polled[0].relative_url.as_deref().unwrap()),
        Some("abc")
    );

    let (id, version) = sim.sample_entity(0);
    let response = api.entity(&id).await;
    assert_eq!(response.status(), 200);
    let read = Entity::from_body(&response.bytes().await.unwrap()).unwrap();
    assert_eq!((read.id.as_str(), read.version), (id.as_str(), version));
    assert_eq!(read.entity_type.as_deref(), Some("Company"));
}
