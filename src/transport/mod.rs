//! Network transport: QUIC endpoints secured by the cluster CA.
//!
//! [`tls`] builds the rustls/quinn configurations for the three kinds of
//! connection a node serves on its single UDP port; [`devcerts`] generates
//! throwaway cluster material for development and tests.

pub mod devcerts;
pub mod frame;
pub mod tls;

pub use devcerts::{generate_dev_material, write_dev_material, DevMaterial};
pub use tls::{
    agent_client_config, agent_client_config_from_file, classify, client_transport,
    peer_certificates, transport_config, ConnectionKind, NodeTls, TlsError, TlsFiles, ALPN_ADMIN,
    ALPN_AGENT, ALPN_PEER, DEFAULT_SERVER_NAME,
};
