//! Throwaway cluster TLS material for development and tests.
//!
//! Generates a self-signed CA plus node and operator certificates with the
//! names and key usages [`super::tls`] expects. Production clusters should
//! issue certificates from a properly guarded CA; this CA key sits in a plain
//! file next to the certificates.

use std::collections::HashSet;
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::tls::{NodeTls, TlsError, DEFAULT_SERVER_NAME};

/// Common name of the dev CA.
const CA_COMMON_NAME: &str = "agentreg dev CA";
/// Common name of the operator certificate.
const OPERATOR_COMMON_NAME: &str = "agentreg-operator";
/// Dev certificates last about ten years, so a dev cluster never expires in use.
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Certificates start an hour in the past to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Generated dev/test TLS material, all PEM encoded.
#[derive(Clone)]
pub struct DevMaterial {
    /// The CA certificate.
    pub ca_cert_pem: String,
    /// The CA private key.
    pub ca_key_pem: String,
    /// `(node id, certificate, private key)` for each node.
    pub nodes: Vec<(u64, String, String)>,
    /// `(certificate, private key)` of the operator CLI.
    pub operator: (String, String),
}

/// Shows certificates but redacts private keys, so the material can be logged.
impl fmt::Debug for DevMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<u64> = self.nodes.iter().map(|(id, _, _)| *id).collect();
        f.debug_struct("DevMaterial")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("nodes", &nodes)
            .field("keys", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl DevMaterial {
    /// The certificate and key PEM of node `id`.
    #[must_use]
    pub fn node(&self, id: u64) -> Option<(&str, &str)> {
        self.nodes
            .iter()
            .find(|(node, _, _)| *node == id)
            .map(|(_, cert, key)| (cert.as_str(), key.as_str()))
    }

    /// The TLS identity of node `id`.
    ///
    /// # Errors
    ///
    /// [`TlsError::UnknownNodeId`] if the material has no such node, otherwise
    /// as [`NodeTls::from_pem`].
    pub fn node_tls(&self, id: u64) -> Result<NodeTls, TlsError> {
        let (cert, key) = self.node(id).ok_or(TlsError::UnknownNodeId(id))?;
        NodeTls::from_pem(&self.ca_cert_pem, cert, key)
    }

    /// The TLS identity of the operator CLI.
    ///
    /// # Errors
    ///
    /// As [`NodeTls::from_pem`].
    pub fn operator_tls(&self) -> Result<NodeTls, TlsError> {
        NodeTls::from_pem(&self.ca_cert_pem, &self.operator.0, &self.operator.1)
    }
}

/// Generates a fresh CA, one certificate per node and an operator certificate.
///
/// Node certificates (CN `agentreg-node-<id>`) carry the DNS names
/// [`DEFAULT_SERVER_NAME`], `node<id>` and `localhost`, the IPs `127.0.0.1` and
/// `::1`, plus `extra_sans` (IP if it parses as one, else DNS), and allow both
/// serverAuth and clientAuth because nodes also dial each other. The operator
/// certificate (CN `agentreg-operator`) only allows clientAuth, so it cannot
/// impersonate a node. All keys are ECDSA P-256.
///
/// # Errors
///
/// [`TlsError::DuplicateNodeId`], [`TlsError::InvalidSan`] for an extra SAN
/// that is neither an IP address nor a valid DNS name, and
/// [`TlsError::Generate`] if rcgen fails.
pub fn generate_dev_material(
    node_ids: &[u64],
    extra_sans: &[String],
) -> Result<DevMaterial, TlsError> {
    let mut seen = HashSet::new();
    if let Some(dup) = node_ids.iter().find(|id| !seen.insert(**id)) {
        return Err(TlsError::DuplicateNodeId(*dup));
    }
    let extra = extra_sans
        .iter()
        .map(|name| parse_san(name))
        .collect::<Result<Vec<_>, _>>()?;

    let mut ca_params = base_params(CA_COMMON_NAME);
    // Path length 0: this CA signs leaf certificates only.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, new_key()?)?;

    let mut nodes = Vec::with_capacity(node_ids.len());
    for &id in node_ids {
        let mut sans = vec![
            dns(DEFAULT_SERVER_NAME)?,
            dns(&format!("node{id}"))?,
            dns("localhost")?,
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        for san in &extra {
            if !sans.contains(san) {
                sans.push(san.clone());
            }
        }
        let (cert, key) = leaf(
            &format!("agentreg-node-{id}"),
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            &ca,
        )?;
        nodes.push((id, cert, key));
    }
    let operator = leaf(
        OPERATOR_COMMON_NAME,
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &ca,
    )?;

    Ok(DevMaterial {
        ca_cert_pem: ca.pem(),
        ca_key_pem: ca.key().serialize_pem(),
        nodes,
        operator,
    })
}

/// Generates dev material and writes `ca.pem`, `ca.key`, `node<ID>.pem`,
/// `node<ID>.key`, `operator.pem` and `operator.key` into `dir`, creating it.
///
/// Without `overwrite`, nothing is written if any of the files already exists,
/// so an existing cluster's CA is never clobbered by accident. Private key
/// files are created with mode 0600 on unix. Returns the written paths in the
/// order above.
///
/// # Errors
///
/// As [`generate_dev_material`], plus [`TlsError::CreateDir`],
/// [`TlsError::WouldOverwrite`] and [`TlsError::Write`].
pub fn write_dev_material(
    dir: &Path,
    node_ids: &[u64],
    extra_sans: &[String],
    overwrite: bool,
) -> Result<Vec<PathBuf>, TlsError> {
    let material = generate_dev_material(node_ids, extra_sans)?;

    // (file name, contents, is a private key)
    let mut files: Vec<(String, &str, bool)> = vec![
        ("ca.pem".into(), &material.ca_cert_pem, false),
        ("ca.key".into(), &material.ca_key_pem, true),
    ];
    for (id, cert, key) in &material.nodes {
        files.push((format!("node{id}.pem"), cert, false));
        files.push((format!("node{id}.key"), key, true));
    }
    files.push(("operator.pem".into(), &material.operator.0, false));
    files.push(("operator.key".into(), &material.operator.1, true));

    std::fs::create_dir_all(dir).map_err(|source| TlsError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    if !overwrite {
        // Check everything first so a refusal leaves no partial set behind.
        // `symlink_metadata` also catches dangling symlinks.
        if let Some((name, _, _)) = files
            .iter()
            .find(|(name, _, _)| dir.join(name).symlink_metadata().is_ok())
        {
            return Err(TlsError::WouldOverwrite {
                path: dir.join(name),
            });
        }
    }

    let mut written = Vec::with_capacity(files.len());
    for (name, contents, secret) in files {
        let path = dir.join(name);
        write_file(&path, contents, secret, overwrite)?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, contents: &str, secret: bool, overwrite: bool) -> Result<(), TlsError> {
    let to_err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        // Closes the race between the existence check and the write.
        options.create_new(true);
    }
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Created private from the start: no window where the key is readable.
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(to_err)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt as _;
        // `mode` only applies to new files; an overwritten one keeps its old mode.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(to_err)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents.as_bytes()).map_err(to_err)?;
    file.sync_all().map_err(to_err)
}

/// Parameters shared by all dev certificates: common name and validity.
fn base_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    // Built from the epoch so that rcgen's `time` types need not be named (and
    // the `time` crate need not be a direct dependency). A clock before 1970
    // is treated as 1970.
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE.min(since_epoch);
    params.not_after = now + VALIDITY;
    params
}

fn leaf(
    common_name: &str,
    sans: Vec<SanType>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    let key = new_key()?;
    let mut params = base_params(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn new_key() -> Result<KeyPair, TlsError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn dns(name: &str) -> Result<SanType, TlsError> {
    // rustls' DNS name check is stricter than IA5 (no spaces, valid labels),
    // so a name that passes it is one clients can actually verify.
    rustls::pki_types::DnsName::try_from(name).map_err(|_| TlsError::InvalidSan {
        name: name.to_owned(),
    })?;
    let ia5 = Ia5String::try_from(name).map_err(|_| TlsError::InvalidSan {
        name: name.to_owned(),
    })?;
    Ok(SanType::DnsName(ia5))
}

fn parse_san(name: &str) -> Result<SanType, TlsError> {
    let name = name.trim();
    match name.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => dns(name),
    }
}
