//! A node's TLS identity, replaceable while the node serves.
//!
//! Certificates expire, some within a day (step-ca's default), so a node must take up a
//! renewed certificate, key or CA bundle without a restart. The configurations a
//! [`LiveTls`] builds hold no material of their own: at every handshake they ask it for the
//! current certificate and verifiers, so [`LiveTls::replace`] takes effect for the next
//! connection, and connections already open carry on with the material they started with.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::{quic_client_config, transport, NodeAuthority, NodeTls, TlsError};
use super::{AGENT_BIDI_STREAMS, AGENT_RECEIVE_WINDOW, ALPN_ADMIN, ALPN_AGENT, ALPN_PEER};

/// The TLS identity a node serves and dials with; see the module doc.
pub struct LiveTls {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

/// One generation of the material, ready for handshakes.
struct Loaded {
    certified: Arc<CertifiedKey>,
    /// Agents present no certificate; one that is presented must chain to the CA.
    clients: Arc<dyn ClientCertVerifier>,
    /// Nodes dialled, and node certificates on accepted peer connections.
    servers: Arc<WebPkiServerVerifier>,
    /// Until when the certificate chain verifies, in seconds since the Unix epoch.
    valid_until: u64,
}

impl LiveTls {
    /// Serves `tls` until it is replaced.
    ///
    /// # Errors
    /// [`TlsError::Verifier`] or [`TlsError::Config`] if rustls refuses the material; not
    /// expected for material that passed [`NodeTls::load`].
    pub fn new(tls: &NodeTls) -> Result<Arc<LiveTls>, TlsError> {
        Ok(Arc::new(LiveTls {
            provider: tls.provider.clone(),
            current: RwLock::new(Arc::new(Loaded::from(tls)?)),
        }))
    }

    /// Takes up `tls` for every connection from now on; returns until when its certificate
    /// chain verifies (seconds since the Unix epoch).
    ///
    /// # Errors
    /// As [`LiveTls::new`]; the material in use is then unchanged.
    pub fn replace(&self, tls: &NodeTls) -> Result<u64, TlsError> {
        let loaded = Arc::new(Loaded::from(tls)?);
        let until = loaded.valid_until;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(until)
    }

    /// Until when the certificate chain in use verifies, in seconds since the Unix epoch.
    #[must_use]
    pub fn valid_until(&self) -> u64 {
        self.current().valid_until
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Server side of a node, serving all three ALPNs; see [`NodeTls::server_config`].
    ///
    /// # Errors
    /// [`TlsError::Config`] or [`TlsError::Quic`] if rustls or quinn refuse the settings.
    pub fn server_config(
        self: &Arc<Self>,
        idle: Duration,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let live = Arc::new(Live(self.clone()));
        let mut tls = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(live.clone())
            .with_cert_resolver(live);
        tls.alpn_protocols = vec![ALPN_AGENT.to_vec(), ALPN_PEER.to_vec(), ALPN_ADMIN.to_vec()];
        // `max_early_data_size` stays 0: 0-RTT data can be replayed, which is a
        // poor fit for registry writes.
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        // The node sends no keep-alives of its own: the dialling side (agent, peer,
        // operator) keeps a connection alive. With tens of thousands of agents, a
        // per-connection keep-alive from the node would be most of its traffic.
        // Every connection starts with an agent's stream limit and flow-control window; peer
        // and operator connections are widened once their ALPN and certificate are known
        // (`widen_streams`).
        let mut transport = transport(Duration::ZERO, idle, AGENT_BIDI_STREAMS);
        transport.receive_window(quinn::VarInt::from_u32(AGENT_RECEIVE_WINDOW));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// Client config a node dials its peers with: presents the current certificate,
    /// verifies the peer against the current CA, ALPN [`ALPN_PEER`].
    ///
    /// # Errors
    /// [`TlsError::Config`] or [`TlsError::Quic`] if rustls or quinn refuse the settings.
    pub fn peer_client_config(self: &Arc<Self>) -> Result<quinn::ClientConfig, TlsError> {
        let live = Arc::new(Live(self.clone()));
        let tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(live.clone())
            .with_client_cert_resolver(live);
        quic_client_config(tls, ALPN_PEER)
    }

    /// What tells node certificates apart on peer connections, by the current CA.
    ///
    /// # Errors
    /// `server_name` is not a valid DNS name or IP address.
    pub fn node_authority(self: &Arc<Self>, server_name: &str) -> Result<NodeAuthority, TlsError> {
        NodeAuthority::new(Arc::new(Live(self.clone())), server_name)
    }
}

impl fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveTls")
            .field("valid_until", &self.valid_until())
            .finish_non_exhaustive()
    }
}

impl Loaded {
    fn from(tls: &NodeTls) -> Result<Loaded, TlsError> {
        let certified =
            CertifiedKey::from_der(tls.chain.clone(), tls.key.clone_key(), &tls.provider)?;
        let clients =
            WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), tls.provider.clone())
                .allow_unauthenticated()
                .build()?;
        let servers =
            WebPkiServerVerifier::builder_with_provider(tls.roots.clone(), tls.provider.clone())
                .build()?;
        Ok(Loaded {
            certified: Arc::new(certified),
            clients,
            servers,
            valid_until: tls.valid_until()?,
        })
    }
}

/// The rustls side of a [`LiveTls`]: each call asks it for the current material.
struct Live(Arc<LiveTls>);

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Live {
    /// How handshake signatures are checked: the provider's algorithms, as the webpki
    /// verifiers do (only the certificate checks depend on the material).
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.0.provider.signature_verification_algorithms
    }
}

impl ResolvesServerCert for Live {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for Live {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Live {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Agents have no certificate (see the module doc of `tls`).
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from material that may be replaced; they are optional, and
        // nodes and operators present their one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

impl ServerCertVerifier for Live {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}
