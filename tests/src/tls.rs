//! Certificates for the TLS tests, made fresh by rcgen for each test: a CA, a server
//! certificate for `localhost` and client certificates it signs. No key material is kept in
//! the repository.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A test certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

impl CertPair {
    /// Writes `{stem}.crt` and `{stem}.key` into `dir` (for programs that read files, like
    /// Envoy and the agent's `--rls-tls-*` flags); returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert, &self.cert).expect("write certificate");
        std::fs::write(&key, &self.key).expect("write key");
        (cert, key)
    }
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert");
        TestCa { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost`.
    pub fn server(&self) -> CertPair {
        self.sign("localhost", ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for `name`.
    pub fn client(&self, name: &str) -> CertPair {
        self.sign(name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn sign(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> CertPair {
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        CertPair { cert: cert.pem(), key: key.serialize_pem() }
    }
}
