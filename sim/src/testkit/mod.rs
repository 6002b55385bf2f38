//! What tests and benchmarks share (feature `testkit`, or this crate's own tests): here a
//! reqwest client that talks to a started simulator the way fenx-sync does (token, bearer,
//! tenant, correlation id), so tests exercise real HTTP; fenx-sync as a child process in
//! [`service`]; benchmark knobs and figures in [`bench`]; the README's SQL cookbook in
//! [`cookbook`].
//!
//! It must never be compiled into the fenx-sync binary (only dev-dependencies enable the
//! feature) and never hide a status code from a test.

pub mod bench;
pub mod cookbook;
pub mod postgres;
pub mod service;

use reqwest::Method;
use serde_json::Value;

use super::Simulator;

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub tenant: String,
    pub token: String,
}

impl Api {
    /// A client holding a fresh token from `sim`.
    pub async fn new(sim: &Simulator) -> Api {
        let http = crate::client_builder().build().unwrap();
        let mut api = Api {
            http,
            base: sim.api_base(),
            tenant: sim.config().tenant_id.clone(),
            token: String::new(),
        };
        let response = api.token_request(sim, &form(sim)).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        api.token = body["access_token"].as_str().unwrap().to_owned();
        api
    }

    pub async fn token_request(
        &self,
        sim: &Simulator,
        fields: &[(&str, String)],
    ) -> reqwest::Response {
        self.http
            .post(sim.token_url())
            .form(fields)
            .send()
            .await
            .unwrap()
    }

    /// GET an entity with every header fenx-sync sends.
    pub async fn entity(&self, id: &str) -> reqwest::Response {
        self.get(&format!("{}/entitydataquery/api/entity/{id}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// The status and parsed body of [`Api::entity`].
    pub async fn entity_json(&self, id: &str) -> (u16, Value) {
        status_and_json(self.entity(id).await).await
    }

    /// `GET {feed}/next`: the status and the batch (`Null` for an empty body).
    pub async fn next_batch(&self, feed: &str) -> (u16, Value) {
        let url = format!("{}/eventnotifications/v2/{feed}/next", self.base);
        status_and_json(self.get(&url).send().await.unwrap()).await
    }

    /// `POST {feed}/{batch}/complete`: the status and the body (`Null` for an empty body).
    pub async fn complete(&self, feed: &str, batch: &str) -> (u16, Value) {
        let url = format!(
            "{}/eventnotifications/v2/{feed}/{batch}/complete",
            self.base
        );
        status_and_json(self.post(&url).send().await.unwrap()).await
    }

    /// A POST of `body` to the paged entity list: the status and the parsed answer.
    pub async fn entity_page(&self, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let url = format!(
            "{}/entitydataquery/api/v2/entity/getentitiespagedlist",
            self.base
        );
        let request = self.post(&url).header("content-type", "application/json");
        status_and_json(request.body(body).send().await.unwrap()).await
    }

    /// A GET to `url` with the bearer token, the tenant and a correlation id.
    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.get_with(url, Some(&self.tenant), Some("test-correlation"))
    }

    /// A POST to `url` with the bearer token, the tenant and a correlation id.
    pub fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.request_with(
            Method::POST,
            url,
            Some(&self.tenant),
            Some("test-correlation"),
        )
    }

    /// A GET to `url` with the bearer token and these headers (reqwest adds a header a second
    /// time rather than replacing it, so tests choose them here).
    pub fn get_with(
        &self,
        url: &str,
        tenant: Option<&str>,
        correlation_id: Option<&str>,
    ) -> reqwest::RequestBuilder {
        self.request_with(Method::GET, url, tenant, correlation_id)
    }

    fn request_with(
        &self,
        method: Method,
        url: &str,
        tenant: Option<&str>,
        correlation_id: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(tenant) = tenant {
            request = request.header("X-TENANT-ID", tenant);
        }
        if let Some(id) = correlation_id {
            request = request.header("x-correlation-id", id);
        }
        request
    }
}

async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    if body.is_empty() {
        return (status, Value::Null);
    }
    (status, serde_json::from_slice(&body).unwrap())
}

/// The form fenx-sync posts to the token endpoint.
pub fn form(sim: &Simulator) -> Vec<(&'static str, String)> {
    let config = sim.config();
    vec![
        ("grant_type", "client_credentials".to_owned()),
        ("client_id", config.client_id.clone()),
        ("client_secret", config.client_secret.clone()),
        ("scope", "fenx.entitydata.read".to_owned()),
    ]
}
