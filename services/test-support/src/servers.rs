//! Where the tests' servers are: the machine's PostgreSQL and RabbitMQ unless
//! the environment says otherwise.

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The PostgreSQL server, without a database (`TEST_POSTGRES_URL`).
pub fn postgres_url() -> String {
    env_or("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
}

/// RabbitMQ's management API (`TEST_RABBITMQ_API`).
pub fn rabbitmq_api() -> String {
    env_or("TEST_RABBITMQ_API", "http://guest:guest@127.0.0.1:15672/api")
}

/// The AMQP server, without a vhost (`TEST_AMQP_BASE`).
pub fn amqp_base() -> String {
    env_or("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
}

/// A management API URL of `segments`, each escaped (vhost and connection
/// names hold characters a path cannot).
pub fn management_url(segments: &[&str]) -> reqwest::Url {
    let mut url = reqwest::Url::parse(&rabbitmq_api()).expect("TEST_RABBITMQ_API is a URL");
    url.path_segments_mut().expect("an http URL").extend(segments);
    url
}
