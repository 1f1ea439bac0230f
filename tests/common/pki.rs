//! Certificates issued by tests: a node certificate renewed by the dev CA, a second CA for a
//! CA rotation. Shaped like `agentreg dev-certs` material (see `transport/devcerts.rs`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA that issues certificates, and its certificate (PEM).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

/// The dev CA's common name (`agentreg dev-certs`): issuing under it needs only its key.
const DEV_CA_NAME: &str = "agentreg dev CA";

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    valid_for(&mut params, Duration::from_secs(365 * 86_400));
    params
}

/// Valid from an hour ago for `duration` from now.
fn valid_for(params: &mut CertificateParams, duration: Duration) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + (now - Duration::from_secs(3_600));
    params.not_after = epoch + (now + duration);
}

impl Ca {
    /// The dev CA whose files (`ca.pem`, `ca.key`) are in `tls_dir`.
    pub fn dev(tls_dir: &Path) -> Ca {
        let key = KeyPair::from_pem(&std::fs::read_to_string(tls_dir.join("ca.key")).unwrap())
            .expect("ca key");
        Ca {
            issuer: Issuer::new(ca_params(DEV_CA_NAME), key),
            cert_pem: std::fs::read_to_string(tls_dir.join("ca.pem")).unwrap(),
        }
    }

    /// A new self-signed CA.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(name);
        let cert_pem = params.self_signed(&key).expect("self-signed").pem();
        Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
        }
    }

    /// A node certificate (serverAuth and clientAuth, the cluster's server name), valid for
    /// `duration` from now: (certificate, key), PEM.
    pub fn node_cert(&self, id: u64, duration: Duration) -> (String, String) {
        self.leaf(
            &format!("agentreg-node-{id}"),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            duration,
        )
    }

    /// An operator certificate (clientAuth only): (certificate, key), PEM.
    pub fn operator_cert(&self) -> (String, String) {
        self.leaf(
            "agentreg-operator",
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            Duration::from_secs(86_400),
        )
    }

    fn leaf(
        &self,
        name: &str,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        duration: Duration,
    ) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![
            agentreg::transport::tls::DEFAULT_SERVER_NAME.to_owned(),
        ])
        .expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        valid_for(&mut params, duration);
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

/// The certificate the node at `addr` presents to an agent that trusts `ca_pem`, or why the
/// handshake failed.
pub async fn presented(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> Result<rustls::pki_types::CertificateDer<'static>, String> {
    use agentreg::transport::tls;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tls::agent_client_config(ca_pem).unwrap());
    let connecting = endpoint
        .connect(addr, tls::DEFAULT_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| "no handshake in 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let chain = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .expect("a server presents its chain");
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(chain[0].clone())
}

/// The DER of the first certificate in `pem`.
pub fn der(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("a certificate")
}
