//! The file CA of the embedded default: a root key and certificate in a directory, created on
//! first use, or an existing root (EC P-256 or RSA >= 2048, PKCS#8 key) used as is.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use x509_parser::prelude::FromDer;

use super::{IdentityError, SpiffeId};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Optional: further roots to trust (e.g. another mesh's), beside the CA's own.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";
/// Lifetime of a root created by `ferry ca init`.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are valid from slightly in the past, for clocks that disagree a little.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

pub struct FileCa {
    origin: String,
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    trust_bundle: Vec<CertificateDer<'static>>,
}

/// A workload's certificate and key (the key never leaves memory).
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: SpiffeId,
    /// Leaf first; the root is not sent.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl std::fmt::Debug for FileCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCa")
            .field("origin", &self.origin)
            .field("roots", &self.trust_bundle.len())
            .finish()
    }
}

impl WorkloadCert {
    /// A certificate chain (leaf first) and the key it certifies, as they come from a signer or
    /// from the agent this one takes over from. The identity is the leaf's URI SAN; the key must
    /// be the one the leaf certifies.
    pub fn from_parts(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Result<WorkloadCert, String> {
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let identity = SpiffeId::from_cert(leaf).map_err(|e| e.to_string())?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err("the certificate is for another key".into());
        }
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        let (not_before, not_after) = (at(parsed.validity().not_before), at(parsed.validity().not_after));
        let serial = parsed.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
        Ok(WorkloadCert {
            identity,
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            serial,
        })
    }

    /// PEM texts of the chain and of the key (PKCS#8): for peers outside the agent (`ferry ca
    /// issue`), and for a new agent taking over from this one.
    pub fn to_pem(&self) -> (String, String) {
        let chain = certs_to_pem(&self.chain);
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", self.key.secret_der().to_vec()));
        (chain, key)
    }

    /// What [`WorkloadCert::to_pem`] gave.
    pub fn from_pem(chain: &str, key: &str) -> Result<WorkloadCert, String> {
        let key = KeyPair::from_pem(key).map_err(|e| format!("key: {e}"))?;
        WorkloadCert::from_parts(parse_bundle(chain)?, &key)
    }
}

impl FileCa {
    /// Creates a new root in `dir` unless one is there already.
    pub fn init(dir: &Path) -> Result<FileCa, IdentityError> {
        let ca_err = |problem: String| IdentityError::Ca { dir: dir.display().to_string(), problem };
        if !dir.join(ROOT_CERT_FILE).exists() {
            std::fs::create_dir_all(dir).map_err(|e| ca_err(e.to_string()))?;
            let (cert_pem, key_pem) = new_root().map_err(ca_err)?;
            write_private(&dir.join(ROOT_KEY_FILE), &key_pem).map_err(|e| ca_err(e.to_string()))?;
            std::fs::write(dir.join(ROOT_CERT_FILE), cert_pem).map_err(|e| ca_err(e.to_string()))?;
        }
        FileCa::load(dir)
    }

    /// Loads an existing root from `dir`.
    pub fn load(dir: &Path) -> Result<FileCa, IdentityError> {
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file)).map_err(|e| IdentityError::Ca {
                dir: dir.display().to_string(),
                problem: format!("{file}: {e}"),
            })
        };
        let cert_pem = read(ROOT_CERT_FILE)?;
        let key_pem = read(ROOT_KEY_FILE)?;
        let bundle = std::fs::read_to_string(dir.join(TRUST_BUNDLE_FILE)).ok();
        FileCa::from_pem(&dir.display().to_string(), &cert_pem, &key_pem, bundle.as_deref())
    }

    /// A CA from the PEM texts of its root certificate, its key and optionally further roots to
    /// trust; `origin` (a directory, a Secret) names where they came from in errors.
    pub fn from_pem(
        origin: &str,
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: Option<&str>,
    ) -> Result<FileCa, IdentityError> {
        let file_err = |file: &str, problem: String| IdentityError::Ca {
            dir: origin.to_owned(),
            problem: format!("{file}: {problem}"),
        };
        let root = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| file_err(ROOT_CERT_FILE, format!("no PEM certificate ({e})")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            file_err(ROOT_KEY_FILE, format!("unusable key, want PKCS#8 EC P-256 or RSA ({e})"))
        })?;
        // A key that is not the certificate's would sign leaves no peer can verify: say so here
        // (e.g. a root replaced file by file, the key not yet written).
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&root)
            .map_err(|e| file_err(ROOT_CERT_FILE, format!("cannot be parsed ({e})")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(file_err(ROOT_KEY_FILE, format!("is not the key of {ROOT_CERT_FILE}")));
        }
        let issuer = Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| file_err(ROOT_CERT_FILE, format!("not a usable CA certificate ({e})")))?;
        let mut trust_bundle = vec![root.clone()];
        trust_bundle.extend(
            parse_bundle(bundle_pem.unwrap_or_default()).map_err(|e| file_err(TRUST_BUNDLE_FILE, e))?,
        );
        Ok(FileCa { origin: origin.to_owned(), root, issuer, trust_bundle })
    }

    /// Where the root came from: a directory or a Secret.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The CA's own root certificate.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Every root to trust: the CA's own plus the optional trust bundle.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.trust_bundle
    }

    /// Mints a leaf for `id` with a fresh EC P-256 key.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Issue { id: id.to_string(), problem: e.to_string() })?;
        let leaf = self.sign(id, &key, ttl)?;
        Ok(WorkloadCert {
            identity: id.clone(),
            chain: vec![leaf.cert],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            serial: leaf.serial,
        })
    }

    /// Signs a leaf for `id` over `public_key` (e.g. from a certificate signing request): one URI
    /// SAN, KU digitalSignature + keyEncipherment, EKU serverAuth + clientAuth. Nothing else a
    /// request asks for is copied.
    pub fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<SignedLeaf, IdentityError> {
        let issue_err = |e: rcgen::Error| IdentityError::Issue { id: id.to_string(), problem: e.to_string() };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(issue_err)?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial: [u8; 16] = rand::random();
        // Positive, non-zero leading byte keeps the DER integer 16 bytes long.
        let serial = [&[0x40 | (serial[0] & 0x3f)], &serial[1..]].concat();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = SystemTime::now();
        let (not_before, not_after) = (now - CLOCK_SKEW, now + ttl);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(public_key, &self.issuer).map_err(issue_err)?;
        Ok(SignedLeaf {
            cert: cert.der().clone(),
            not_before,
            not_after,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// A leaf certificate this CA signed.
#[derive(Debug)]
pub struct SignedLeaf {
    pub cert: CertificateDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex.
    pub serial: String,
}

/// A new self-signed root (EC P-256): its certificate and PKCS#8 key, PEM.
pub fn new_root() -> Result<(String, String), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "ferry");
    // A distinct name per root, so roots of separate meshes never look like each other.
    let tag: u32 = rand::random();
    params.distinguished_name.push(DnType::CommonName, format!("Ferry root CA {tag:08x}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + ROOT_TTL).into();
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Certificates as one PEM text.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec()))).collect()
}

/// The certificates of a PEM bundle (empty text: none).
pub(super) fn parse_bundle(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.map_err(|e| e.to_string())).collect()
}

/// The roots to trust of a CA directory without a key (Kubernetes mode: the signer holds the
/// key): its root certificate plus the optional trust bundle.
pub fn load_roots(dir: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let ca_err = |file: &str, problem: String| IdentityError::Ca {
        dir: dir.display().to_string(),
        problem: format!("{file}: {problem}"),
    };
    let root = std::fs::read_to_string(dir.join(ROOT_CERT_FILE))
        .map_err(|e| ca_err(ROOT_CERT_FILE, e.to_string()))?;
    let mut roots = parse_bundle(&root).map_err(|e| ca_err(ROOT_CERT_FILE, e))?;
    if roots.is_empty() {
        return Err(ca_err(ROOT_CERT_FILE, "no PEM certificate".into()));
    }
    if let Ok(bundle) = std::fs::read_to_string(dir.join(TRUST_BUNDLE_FILE)) {
        roots.extend(parse_bundle(&bundle).map_err(|e| ca_err(TRUST_BUNDLE_FILE, e))?);
    }
    Ok(roots)
}

/// Writes a file only its owner can read (private keys).
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_creates_once_and_issues_spiffe_leaves() {
        let dir = temp_dir("init");
        let ca = FileCa::init(&dir).unwrap();
        let root = ca.root().clone();
        // Second init keeps the existing root.
        assert_eq!(FileCa::init(&dir).unwrap().root(), &root);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(ROOT_KEY_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        let id = SpiffeId::new("cluster.local", "ns1", "sa1");
        let leaf = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(SpiffeId::from_cert(&leaf.chain[0]).unwrap(), id);
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = parsed.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature() && ku.value.key_encipherment());
        assert_eq!(parsed.raw_serial().len(), 16);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A root made elsewhere (here by openssl, RSA 2048) is used as is and its leaves chain to it.
    #[test]
    fn existing_rsa_root_is_used_as_is() {
        let dir = temp_dir("rsa");
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/O=elsewhere/CN=mesh root",
            ])
            .args([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ])
            .arg("-keyout")
            .arg(dir.join(ROOT_KEY_FILE))
            .arg("-out")
            .arg(dir.join(ROOT_CERT_FILE))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success());
        let original = std::fs::read(dir.join(ROOT_CERT_FILE)).unwrap();
        let ca = FileCa::init(&dir).unwrap();
        assert_eq!(
            std::fs::read(dir.join(ROOT_CERT_FILE)).unwrap(),
            original,
            "init replaced an existing root"
        );

        let leaf = ca.issue(&SpiffeId::new("cluster.local", "ns", "sa"), Duration::from_secs(60)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root().clone()).unwrap();
        let provider = crate::identity::tls::provider();
        let parsed = rustls::server::ParsedCertificate::try_from(&leaf.chain[0]).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .expect("leaf chains to the RSA root");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_ca_files_are_named() {
        let dir = temp_dir("bad");
        std::fs::create_dir_all(&dir).unwrap();
        let err = FileCa::load(&dir).unwrap_err().to_string();
        assert!(err.contains("root-cert.pem"), "{err}");
        std::fs::write(dir.join(ROOT_CERT_FILE), "garbage").unwrap();
        std::fs::write(dir.join(ROOT_KEY_FILE), "garbage").unwrap();
        let err = FileCa::load(&dir).unwrap_err().to_string();
        assert!(err.contains("root-cert.pem: no PEM certificate"), "{err}");
        // Each file valid on its own, but the key is another root's.
        let (cert, _) = new_root().unwrap();
        let (_, other_key) = new_root().unwrap();
        std::fs::write(dir.join(ROOT_CERT_FILE), cert).unwrap();
        std::fs::write(dir.join(ROOT_KEY_FILE), other_key).unwrap();
        let err = FileCa::load(&dir).unwrap_err().to_string();
        assert!(err.contains("root-key.pem: is not the key of root-cert.pem"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
