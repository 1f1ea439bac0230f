//! TLS configuration for the QUIC transport.
//!
//! Every node serves one UDP port and tells its three kinds of caller apart by
//! ALPN:
//!
//! * [`ALPN_AGENT`]: agents, which have no client certificate; they only check
//!   that they talk to a node of the cluster.
//! * [`ALPN_PEER`]: node-to-node Raft traffic, mutual TLS.
//! * [`ALPN_ADMIN`]: the operator CLI, mutual TLS.
//!
//! Because the agent ALPN must work without a client certificate, the server
//! makes client certificates *optional* at the TLS layer; a certificate that
//! *is* presented must still chain to the cluster CA or the handshake fails.
//! Whether a certificate is *required* depends on the negotiated ALPN, which is
//! only known after the handshake, so [`classify`] enforces it right after a
//! connection is accepted.
//!
//! All configurations are built with an explicit ring [`CryptoProvider`] so
//! nothing depends on a process-wide default provider having been installed,
//! and they only offer TLS 1.3, the only version QUIC allows.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, NoInitialCipherSuite, QuicClientConfig};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

pub use super::devcerts::{generate_dev_material, write_dev_material, DevMaterial};
pub use live::LiveTls;

mod live;

/// ALPN of agent connections (no client certificate).
pub const ALPN_AGENT: &[u8] = b"agentreg/1";
/// ALPN of node-to-node (Raft) connections (mutual TLS).
pub const ALPN_PEER: &[u8] = b"agentreg-peer/1";
/// ALPN of operator CLI connections (mutual TLS).
pub const ALPN_ADMIN: &[u8] = b"agentreg-admin/1";
/// Default TLS server name every node certificate carries and clients verify.
///
/// Nodes are dialled by address, and addresses change (containers, NAT), so
/// clients verify this one shared name instead of a per-node host name.
pub const DEFAULT_SERVER_NAME: &str = "agentreg";

/// Keep-alive interval of [`transport_config`].
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Idle timeout of the dialling side's connections (peers, operators, raw agent configs),
/// and the least a node accepts from agents (see [`NodeTls::server_config`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent bidirectional streams a peer or operator may open: Raft and forwarded
/// writes open one stream per request, so the quinn default of 100 is too tight.
const MAX_BIDI_STREAMS: u32 = 1024;
/// Concurrent bidirectional streams an agent may open (one per request in flight). quinn
/// allocates the state of every stream a connection may open up front, so with tens of
/// thousands of agents this limit is most of a node's memory per agent: at 1024 it was
/// over 100 KiB per connection.
pub const AGENT_BIDI_STREAMS: u32 = 64;
/// Streams a node may open towards an agent: one ping at a time.
const AGENT_INCOMING_STREAMS: u32 = 8;
/// Bytes an agent may have in flight to a node on one connection, unread by the node (QUIC
/// connection-level flow control). The node reads each request as it comes, so this only
/// binds what arrives while a stream's request is being served: without it quinn's default
/// (no connection limit, 1.25 MB per stream) let one agent connection park some 80 MB on
/// its node behind 64 slow requests. Four largest requests fit at once.
const AGENT_RECEIVE_WINDOW: u32 = 256 * 1024;

/// Errors from loading TLS material, building configurations, generating dev
/// material and classifying connections.
///
/// Messages never include key material: parse errors for private keys carry no
/// detail from the parser, which could quote bytes of the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file to read does not exist.
    #[error("{} does not exist", path.display())]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The unreadable file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A PEM input contains no certificate.
    #[error("no certificate in {what}")]
    NoCertificate {
        /// The file path, or a label such as "ca pem" for in-memory input.
        what: String,
    },
    /// A PEM input contains no private key.
    #[error("no private key in {what}")]
    NoPrivateKey {
        /// The file path, or a label such as "key pem" for in-memory input.
        what: String,
    },
    /// A certificate PEM input is malformed.
    #[error("malformed certificate pem in {what}: {detail}")]
    CertificatePem {
        /// The file path or label.
        what: String,
        /// What the PEM parser objected to.
        detail: String,
    },
    /// A private key PEM input is malformed (no detail, see the type docs).
    #[error("malformed private key pem in {what}")]
    KeyPem {
        /// The file path or label.
        what: String,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("invalid ca certificate in {what}: {source}")]
    InvalidCa {
        /// The file path or label.
        what: String,
        /// Why rustls rejected it.
        source: rustls::Error,
    },
    /// The private key cannot be used, or does not belong to the certificate.
    #[error("private key in {key} does not fit the certificate in {cert}: {source}")]
    KeyMismatch {
        /// Where the certificate came from.
        cert: String,
        /// Where the key came from.
        key: String,
        /// Why rustls rejected the pair.
        source: rustls::Error,
    },
    /// The certificate does not chain to the CA (or is expired, or lacks the
    /// clientAuth extended key usage).
    #[error("certificate in {cert} is not trusted by the ca in {ca}: {source}")]
    Untrusted {
        /// Where the certificate came from.
        cert: String,
        /// Where the CA came from.
        ca: String,
        /// Why verification failed.
        source: rustls::Error,
    },
    /// rustls refused to build a configuration.
    #[error("cannot build tls config: {0}")]
    Config(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("cannot build client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// The rustls configuration lacks what QUIC needs.
    #[error("tls config is unusable for quic: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    /// Certificate generation failed.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// An extra subject alternative name is neither an IP address nor a valid DNS name.
    #[error("invalid subject alternative name {name:?}")]
    InvalidSan {
        /// The rejected name.
        name: String,
    },
    /// The same node id was given twice.
    #[error("duplicate node id {0}")]
    DuplicateNodeId(u64),
    /// Dev material was asked for a node it does not contain.
    #[error("no dev material for node {0}")]
    UnknownNodeId(u64),
    /// A file exists and overwriting was not allowed.
    #[error("refusing to overwrite existing file {}", path.display())]
    WouldOverwrite {
        /// The existing file.
        path: PathBuf,
    },
    /// A directory could not be created.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The connection negotiated no ALPN.
    #[error("connection negotiated no application protocol")]
    NoAlpn,
    /// The connection negotiated an ALPN this node does not serve.
    #[error("unknown application protocol {0:?}")]
    UnknownAlpn(String),
    /// A peer or admin connection came without a client certificate.
    #[error("{kind} connection presented no client certificate")]
    NoClientCertificate {
        /// What the connection asked to be.
        kind: ConnectionKind,
    },
    /// This node's own certificate would not be accepted by its peers as a node's: it
    /// lacks serverAuth or the cluster's server name.
    #[error("certificate in {cert} is not a node certificate for server name {name:?}: {source}")]
    NotANodeCertificate {
        /// Where the certificate came from.
        cert: String,
        /// The server name it must carry.
        name: String,
        /// Why verification as a server certificate failed.
        source: rustls::Error,
    },
    /// A peer connection presented a certificate of the cluster CA that is not a node's
    /// (an operator's, say): it lacks serverAuth or the cluster's server name.
    #[error("peer connection presented a certificate that is not a node certificate: {0}")]
    NotANode(rustls::Error),
}

/// Paths of the PEM files a node (or the operator CLI) loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate(s); several are allowed during CA rotation.
    pub ca: PathBuf,
    /// This node's certificate, optionally followed by intermediates.
    pub cert: PathBuf,
    /// This node's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// The TLS identity of a node (or of the operator): CA roots, certificate
/// chain and private key, checked for consistency when loaded.
pub struct NodeTls {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Where the certificate came from, for errors.
    cert_source: String,
}

impl Clone for NodeTls {
    fn clone(&self) -> Self {
        Self {
            provider: self.provider.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            cert_source: self.cert_source.clone(),
        }
    }
}

/// Shows only counts, so the private key never ends up in a log.
impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// A QUIC endpoint secret derived from the node's private key (see [`endpoint_config`]).
    /// A node writes it into a new data dir and uses the one kept there from then on, since
    /// the key may be renewed (daily, with some CAs) and the secret must not change with it.
    /// Nodes of earlier builds derived it at every start: an upgraded node writes the one
    /// its previous run used, and so still resets that run's connections.
    #[must_use]
    pub fn endpoint_secret(&self) -> [u8; ENDPOINT_SECRET_LEN] {
        use sha2::{Digest, Sha256};
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut h = Sha256::new();
            h.update(label);
            h.update(self.key.secret_der());
            h.finalize().into()
        };
        let mut secret = [0u8; ENDPOINT_SECRET_LEN];
        secret[..32].copy_from_slice(&derive(b"agentreg/quic-stateless-reset/v1\0"));
        secret[32..].copy_from_slice(&derive(b"agentreg/quic-connection-id/v1\0")[..8]);
        secret
    }

    /// Loads and checks the PEM files named in `files`.
    ///
    /// # Errors
    ///
    /// Names the offending file when it is missing or unreadable, holds no
    /// certificate or no key, is malformed, when the key does not belong to the
    /// certificate, or when the certificate does not chain to the CA (see
    /// [`NodeTls::from_pem`]).
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = read_file(&files.ca)?;
        let cert = read_file(&files.cert)?;
        let key = read_file(&files.key)?;
        Self::parse(
            (&ca, &files.ca.display().to_string()),
            (&cert, &files.cert.display().to_string()),
            (&key, &files.key.display().to_string()),
        )
    }

    /// Builds the identity from in-memory PEM text.
    ///
    /// Checks up front what would otherwise surface as an obscure handshake
    /// failure later: that the key belongs to the certificate, and that the
    /// certificate is currently valid, chains to the CA and allows client
    /// authentication (nodes present it when dialling peers).
    ///
    /// # Errors
    ///
    /// [`TlsError::NoCertificate`], [`TlsError::NoPrivateKey`],
    /// [`TlsError::CertificatePem`], [`TlsError::KeyPem`],
    /// [`TlsError::InvalidCa`], [`TlsError::KeyMismatch`] or
    /// [`TlsError::Untrusted`], labelled "ca pem", "certificate pem" or "key pem".
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Self::parse(
            (ca_pem.as_bytes(), "ca pem"),
            (cert_pem.as_bytes(), "certificate pem"),
            (key_pem.as_bytes(), "key pem"),
        )
    }

    /// Each argument is the PEM bytes and what to call their source in errors.
    fn parse(ca: (&[u8], &str), cert: (&[u8], &str), key: (&[u8], &str)) -> Result<Self, TlsError> {
        let provider = ring_provider();
        let roots = parse_roots(ca.0, ca.1)?;
        let chain = parse_certs(cert.0, cert.1)?;
        let private_key = parse_key(key.0, key.1)?;

        CertifiedKey::from_der(chain.clone(), private_key.clone_key(), &provider).map_err(
            |source| TlsError::KeyMismatch {
                cert: cert.1.to_owned(),
                key: key.1.to_owned(),
                source,
            },
        )?;

        let (leaf, intermediates) = chain.split_first().ok_or_else(|| TlsError::NoCertificate {
            what: cert.1.to_owned(),
        })?;
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()?
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|source| TlsError::Untrusted {
                cert: cert.1.to_owned(),
                ca: ca.1.to_owned(),
                source,
            })?;

        Ok(Self {
            provider,
            roots,
            chain,
            key: private_key,
            cert_source: cert.1.to_owned(),
        })
    }

    /// Checks that peers will take this certificate for a node's: valid as a server
    /// certificate for `server_name` (serverAuth and the name), not only as a client's.
    ///
    /// # Errors
    /// [`TlsError::NotANodeCertificate`], or [`TlsError::Config`] for an invalid name.
    pub fn check_node_certificate(&self, server_name: &str) -> Result<(), TlsError> {
        let authority = self.node_authority(server_name)?;
        let (leaf, intermediates) = self.chain.split_first().expect("parse requires a leaf");
        authority
            .verifier
            .verify_server_cert(leaf, intermediates, &authority.name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|source| TlsError::NotANodeCertificate {
                cert: self.cert_source.clone(),
                name: server_name.to_owned(),
                source,
            })
    }

    /// Until when the certificate chain verifies, in seconds since the Unix epoch: the
    /// earliest expiry of the certificate and its intermediates (found by verifying it at
    /// later and later times, as a peer would then). 0 if it does not verify now.
    ///
    /// # Errors
    /// [`TlsError::Verifier`] if the verifier cannot be built (not expected for material
    /// that was loaded).
    pub fn valid_until(&self) -> Result<u64, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()?;
        let (leaf, intermediates) = self.chain.split_first().expect("parse requires a leaf");
        let verifies = |secs: u64| {
            let at = UnixTime::since_unix_epoch(Duration::from_secs(secs));
            verifier.verify_client_cert(leaf, intermediates, at).is_ok()
        };
        let now = UnixTime::now().as_secs();
        if !verifies(now) {
            return Ok(0);
        }
        // Valid from `now` to the expiry and not after: search the boundary.
        let (mut valid, mut invalid) = (now, now + (1 << 32));
        if verifies(invalid) {
            return Ok(invalid);
        }
        while invalid - valid > 1 {
            let mid = valid + (invalid - valid) / 2;
            if verifies(mid) {
                valid = mid;
            } else {
                invalid = mid;
            }
        }
        Ok(valid)
    }

    /// What tells node certificates apart on peer connections (see [`NodeAuthority`]).
    ///
    /// # Errors
    /// `server_name` is not a valid DNS name or IP address, or the verifier cannot be built.
    pub fn node_authority(&self, server_name: &str) -> Result<NodeAuthority, TlsError> {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            self.provider.clone(),
        )
        .build()?;
        NodeAuthority::new(verifier, server_name)
    }

    /// Server side of a node, serving all three ALPNs.
    ///
    /// Client certificates are optional at the TLS layer because agents have
    /// none, but a presented certificate that does not chain to the cluster CA
    /// fails the handshake. Use [`classify`] on each accepted connection to
    /// require a certificate for peer and admin traffic.
    ///
    /// # Errors
    ///
    /// [`TlsError::Verifier`], [`TlsError::Config`] or [`TlsError::Quic`] if
    /// rustls or quinn refuse the material; not expected for material that
    /// passed [`NodeTls::load`].
    ///
    /// `idle` is the longest silence the node accepts on a connection; the dialling side
    /// may ask for less (QUIC uses the smaller of the two), and peers and operators do.
    pub fn server_config(&self, idle: Duration) -> Result<quinn::ServerConfig, TlsError> {
        LiveTls::new(self)?.server_config(idle)
    }

    /// Client config a node uses to dial peers: presents its own certificate,
    /// verifies the server against the CA, ALPN [`ALPN_PEER`].
    ///
    /// Connect with server name [`DEFAULT_SERVER_NAME`].
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] or [`TlsError::Quic`] if rustls or quinn refuse
    /// the material.
    pub fn peer_client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        LiveTls::new(self)?.peer_client_config()
    }

    /// Client config for the operator CLI: presents the operator certificate,
    /// verifies the server against the CA, ALPN [`ALPN_ADMIN`].
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] or [`TlsError::Quic`] if rustls or quinn refuse
    /// the material.
    pub fn admin_client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        self.mutual_client_config(ALPN_ADMIN)
    }

    /// The certificate chain this identity presents, leaf first.
    #[must_use]
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    fn mutual_client_config(&self, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
        let tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        quic_client_config(tls, alpn)
    }
}

/// Agent-side client config: verifies nodes against the CA in `ca_pem`,
/// presents no client certificate, ALPN [`ALPN_AGENT`].
///
/// Connect with server name [`DEFAULT_SERVER_NAME`].
///
/// # Errors
///
/// [`TlsError::NoCertificate`], [`TlsError::CertificatePem`] or
/// [`TlsError::InvalidCa`] (labelled "ca pem") if the CA is unusable.
pub fn agent_client_config(ca_pem: &str) -> Result<quinn::ClientConfig, TlsError> {
    agent_config(parse_roots(ca_pem.as_bytes(), "ca pem")?)
}

/// [`agent_client_config`] with the CA read from a file.
///
/// # Errors
///
/// As [`agent_client_config`], naming the file, plus [`TlsError::Missing`]
/// and [`TlsError::Read`].
pub fn agent_client_config_from_file(ca: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let pem = read_file(ca)?;
    agent_config(parse_roots(&pem, &ca.display().to_string())?)
}

fn agent_config(roots: Arc<RootCertStore>) -> Result<quinn::ClientConfig, TlsError> {
    let tls = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = quic_client_config(tls, ALPN_AGENT)?;
    config.transport_config(agent_transport(KEEP_ALIVE, IDLE_TIMEOUT));
    Ok(config)
}

fn quic_client_config(
    mut tls: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// What an accepted connection is for, from its negotiated ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionKind {
    /// An agent ([`ALPN_AGENT`]); may have no client certificate.
    Agent,
    /// Another node ([`ALPN_PEER`]); presented a CA-signed certificate.
    Peer,
    /// The operator CLI ([`ALPN_ADMIN`]); presented a CA-signed certificate.
    Admin,
}

impl ConnectionKind {
    /// The ALPN identifier of this kind.
    #[must_use]
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Self::Agent => ALPN_AGENT,
            Self::Peer => ALPN_PEER,
            Self::Admin => ALPN_ADMIN,
        }
    }

    /// The kind an ALPN identifier stands for, if any.
    #[must_use]
    pub fn from_alpn(alpn: &[u8]) -> Option<Self> {
        [Self::Agent, Self::Peer, Self::Admin]
            .into_iter()
            .find(|kind| kind.alpn() == alpn)
    }

    /// Whether this kind of connection must present a client certificate.
    #[must_use]
    pub fn requires_client_certificate(self) -> bool {
        !matches!(self, Self::Agent)
    }
}

impl fmt::Display for ConnectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Agent => "agent",
            Self::Peer => "peer",
            Self::Admin => "admin",
        })
    }
}

/// Classifies a connection the server accepted, by negotiated ALPN and client
/// certificate.
///
/// A presented certificate was already verified against the CA during the
/// handshake, so here only its presence matters. Note that any CA-signed
/// client certificate qualifies for [`ConnectionKind::Peer`] and
/// [`ConnectionKind::Admin`]; callers wanting finer policy can inspect
/// [`peer_certificates`].
///
/// # Errors
///
/// [`TlsError::NoAlpn`] or [`TlsError::UnknownAlpn`] when the ALPN is missing
/// or unknown, and [`TlsError::NoClientCertificate`] when a peer or admin
/// connection presented no certificate. The caller should then close the
/// connection.
pub fn classify(conn: &quinn::Connection) -> Result<ConnectionKind, TlsError> {
    let alpn = conn
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .ok_or(TlsError::NoAlpn)?;
    let kind = ConnectionKind::from_alpn(&alpn)
        .ok_or_else(|| TlsError::UnknownAlpn(String::from_utf8_lossy(&alpn).into_owned()))?;
    if kind.requires_client_certificate() && peer_certificates(conn).is_none() {
        return Err(TlsError::NoClientCertificate { kind });
    }
    Ok(kind)
}

/// Tells node certificates from the other certificates of the cluster CA. Only a node may
/// speak the peer protocol (Raft): a client certificate on a peer connection must also be
/// valid as a node's server certificate, that is carry serverAuth and the cluster's server
/// name, which operator certificates (clientAuth only) do not.
#[derive(Clone)]
pub struct NodeAuthority {
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl NodeAuthority {
    fn new(
        verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
        server_name: &str,
    ) -> Result<NodeAuthority, TlsError> {
        let name =
            rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|_| {
                TlsError::Config(rustls::Error::General(format!(
                    "invalid server name {server_name:?}"
                )))
            })?;
        Ok(NodeAuthority { verifier, name })
    }

    /// Checks that the client certificate of `conn` is a node certificate.
    ///
    /// # Errors
    /// [`TlsError::NoClientCertificate`] or [`TlsError::NotANode`].
    pub fn check(&self, conn: &quinn::Connection) -> Result<(), TlsError> {
        let chain = peer_certificates(conn).ok_or(TlsError::NoClientCertificate {
            kind: ConnectionKind::Peer,
        })?;
        let (leaf, intermediates) = chain.split_first().ok_or(TlsError::NoClientCertificate {
            kind: ConnectionKind::Peer,
        })?;
        self.verifier
            .verify_server_cert(leaf, intermediates, &self.name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(TlsError::NotANode)
    }
}

/// The client certificate chain the peer presented (leaf first), or `None` if
/// it presented none.
#[must_use]
pub fn peer_certificates(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|chain| *chain)
        .filter(|chain| !chain.is_empty())
}

/// Transport settings shared by servers and clients: keep-alive every second
/// and a 10 s idle timeout, so a dead peer is noticed quickly (Raft relies on
/// it), and room for 1024 concurrent bidirectional streams.
#[must_use]
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    client_transport(KEEP_ALIVE, IDLE_TIMEOUT)
}

/// Like [`transport_config`] with a custom keep-alive interval and idle
/// timeout; zero disables either. Idle timeouts beyond what QUIC can encode
/// (about 146 million years) are capped.
#[must_use]
pub fn client_transport(keep_alive: Duration, idle: Duration) -> Arc<quinn::TransportConfig> {
    Arc::new(transport(keep_alive, idle, MAX_BIDI_STREAMS))
}

/// Transport of an agent's connection: like [`client_transport`], but the node may open
/// only a few streams towards it (pings), which keeps the agent's memory small.
#[must_use]
pub fn agent_transport(keep_alive: Duration, idle: Duration) -> Arc<quinn::TransportConfig> {
    Arc::new(transport(keep_alive, idle, AGENT_INCOMING_STREAMS))
}

/// Lets a peer or operator connection open as many concurrent streams as Raft needs, and
/// send without a connection-wide flow-control limit (the node accepts every connection
/// with an agent's limits).
pub fn widen_streams(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(MAX_BIDI_STREAMS));
    conn.set_receive_window(quinn::VarInt::MAX);
}

/// Ack-eliciting packets the other side may receive before it must acknowledge.
const ACK_ELICITING_THRESHOLD: u32 = 8;

fn transport(keep_alive: Duration, idle: Duration, bidi: u32) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval((!keep_alive.is_zero()).then_some(keep_alive));
    let idle = quinn::IdleTimeout::try_from(idle)
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::MAX));
    transport.max_idle_timeout(Some(idle));
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(bidi));
    // No unidirectional streams in any of the three protocols.
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Ask the other side (if it knows the QUIC ACK frequency extension; quinn does) to
    // acknowledge every ninth ack-eliciting packet, or after its max_ack_delay, rather than
    // every second: requests and answers carry the acknowledgements both ways anyway, and at
    // many requests in flight the acknowledgement-only packets were a fifth of all packets.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    transport.ack_frequency_config(Some(ack));
    transport
}

/// The length of a QUIC endpoint secret: a stateless-reset key (32 bytes) and a
/// connection-id key (8).
pub const ENDPOINT_SECRET_LEN: usize = 40;

/// The QUIC endpoint config of a node whose endpoint secret is `secret` (see
/// [`NodeTls::endpoint_secret`]). With the same secret in every run, a restarted node
/// answers packets of its previous run's connections with a stateless reset, and peers and
/// agents drop those connections at once instead of sending into them until the idle
/// timeout (a peer that keeps talking to a dead connection cannot even vote).
#[must_use]
pub fn endpoint_config(secret: &[u8; ENDPOINT_SECRET_LEN]) -> quinn::EndpointConfig {
    let (reset, cid) = secret.split_at(32);
    let mut config =
        quinn::EndpointConfig::new(Arc::new(ResetKey(reset.try_into().expect("32 bytes"))));
    // The endpoint only resets packets whose connection id it could have issued, so the
    // connection-id generator's key must outlive the process too.
    let cid_key = u64::from_le_bytes(cid.try_into().expect("8 bytes"));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// HMAC-SHA256 key for QUIC stateless-reset tokens (see [`endpoint_config`]).
struct ResetKey([u8; 32]);

impl ResetKey {
    fn mac(&self, data: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        m.update(data);
        m
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        use hmac::Mac;
        let tag = self.mac(data).finalize().into_bytes();
        let n = signature_out.len().min(tag.len());
        signature_out[..n].copy_from_slice(&tag[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        use hmac::Mac;
        self.mac(data)
            .verify_slice(signature)
            .map_err(|_| quinn::crypto::CryptoError)
    }
}

/// The ring provider, built once; passed explicitly to every builder.
pub(crate) fn ring_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::Missing {
            path: path.to_owned(),
        },
        _ => TlsError::Read {
            path: path.to_owned(),
            source,
        },
    })
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::CertificatePem {
            what: what.to_owned(),
            detail: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

fn parse_roots(pem: &[u8], what: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(pem, what)? {
        roots.add(cert).map_err(|source| TlsError::InvalidCa {
            what: what.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| match err {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            what: what.to_owned(),
        },
        // The parser's message may quote parts of the key: keep it out.
        _ => TlsError::KeyPem {
            what: what.to_owned(),
        },
    })
}
