import Crypto
import _CryptoExtras
import Foundation
import SwiftASN1
import X509

/// Why the CA refused to sign. Each case is counted and written to the audit log with its text.
public enum SigningError: Error, Equatable, CustomStringConvertible, Sendable {
    /// Not a PEM or DER PKCS#10 request.
    case malformedRequest(String)
    /// The request's signature does not verify with its own public key.
    case badRequestSignature
    /// The request names an identity (URI SAN) other than the one being issued.
    case identityMismatch(requested: String, issuing: String)
    /// The identity belongs to another trust domain than the CA's.
    case wrongTrustDomain(String)
    /// Neither ECDSA P-256/P-384 nor RSA of at least 2048 bits.
    case weakKey(String)
    /// The node asking does not host a workload with this identity.
    case notAuthorized(node: String, identity: String)

    public var description: String {
        switch self {
        case .malformedRequest(let why): return "malformed certificate signing request: \(why)"
        case .badRequestSignature: return "the request's signature does not match its public key"
        case .identityMismatch(let r, let i): return "the request asks for \(r), not \(i)"
        case .wrongTrustDomain(let td): return "trust domain \(td) is not this CA's"
        case .weakKey(let k): return "key \(k) is not accepted (ECDSA P-256/P-384 or RSA >= 2048)"
        case .notAuthorized(let n, let i): return "node \(n) hosts no workload with identity \(i)"
        }
    }

    /// A short label for metrics.
    public var reason: String {
        switch self {
        case .malformedRequest: return "malformed"
        case .badRequestSignature: return "bad_signature"
        case .identityMismatch: return "identity_mismatch"
        case .wrongTrustDomain: return "wrong_trust_domain"
        case .weakKey: return "weak_key"
        case .notAuthorized: return "not_authorized"
        }
    }
}

/// One signing decision, as the audit log records it.
public struct AuditRecord: Sendable, Equatable {
    public var time: Date
    /// Who asked: the node identity (or the bootstrap token's node name).
    public var requester: String
    public var identity: String
    public var granted: Bool
    /// The certificate's serial (hex) and expiry when granted; the refusal's text otherwise.
    public var detail: String
}

/// A certificate issued by the CA, PEM-encoded: the leaf, the intermediates up to (not including) the root, and
/// the roots the peer should trust.
public struct IssuedCertificate: Sendable {
    public var certificate: String
    public var chain: [String]
    public var trustBundle: [String]
    public var notAfter: Date
    public var serial: String
}

/// The mesh's certificate authority (Istio's Citadel): signs short-lived workload certificates with SPIFFE URI
/// SANs. The signing key lives only here; callers pass requests in and get certificates out.
///
/// Immutable and `Sendable`: signatures run on any thread.
public final class CertificateAuthority: Sendable {
    public let trustDomain: String
    /// The CA's own certificate (a self-signed root, or an intermediate under a plug-in root).
    let certificate: Certificate
    let key: Certificate.PrivateKey
    /// Certificates between the CA's and the root (plug-in CA), PEM.
    let intermediates: [String]
    public let trustBundle: [String]
    public let maxLifetime: Duration
    private let audit: @Sendable (AuditRecord) -> Void

    /// A new self-signed root (ECDSA P-256) held in memory, for the embedded default CA and tests.
    public convenience init(generatingRootFor trustDomain: String, validity: Duration = .seconds(10 * 365 * 86_400),
                            maxLifetime: Duration = .seconds(86_400), now: Date = Date(),
                            audit: @escaping @Sendable (AuditRecord) -> Void = { _ in }) throws {
        let root = try Self.newRoot(trustDomain: trustDomain, validity: validity, now: now)
        try self.init(trustDomain: trustDomain, certificatePEM: root.certificatePEM, keyPEM: root.keyPEM,
                      rootPEM: [root.certificatePEM], maxLifetime: maxLifetime, audit: audit)
    }

    /// A new self-signed root (ECDSA P-256) as PEM files' contents, for a CA that keeps its root across restarts
    /// (written once by the control plane, key mode 0600, then loaded like a plug-in CA).
    public static func newRoot(trustDomain: String, validity: Duration = .seconds(10 * 365 * 86_400),
                               now: Date = Date()) throws -> (certificatePEM: String, keyPEM: String) {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try DistinguishedName {
            OrganizationName(trustDomain)
            CommonName("Sluice root CA")
        }
        let cert = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-300), notValidAfter: now.addingTimeInterval(validity.seconds),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: key.publicKey)
            },
            issuerPrivateKey: key)
        return (try pem(cert), terminated(try key.serializeAsPEM().pemString))
    }

    /// A plug-in CA (Istio's `cacerts`): the CA certificate and key, its chain up to the root, and the root(s).
    /// - Parameters:
    ///   - certificatePEM: the CA's certificate (`ca-cert.pem`).
    ///   - keyPEM: its private key (`ca-key.pem`).
    ///   - chainPEM: intermediates between it and the root, if any (`cert-chain.pem` minus the CA itself).
    ///   - rootPEM: the root(s) workloads trust (`root-cert.pem`).
    public init(trustDomain: String, certificatePEM: String, keyPEM: String, chainPEM: [String] = [], rootPEM: [String],
                maxLifetime: Duration = .seconds(86_400), audit: @escaping @Sendable (AuditRecord) -> Void = { _ in }) throws {
        let cert = try Certificate(pemEncoded: certificatePEM)
        let key = try Certificate.PrivateKey(pemEncoded: keyPEM)
        guard key.publicKey == cert.publicKey else { throw CAFileError("the CA key does not belong to the CA certificate") }
        guard let bc = try cert.extensions.basicConstraints, case .isCertificateAuthority = bc else {
            throw CAFileError("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")
        }
        self.trustDomain = trustDomain
        certificate = cert
        self.key = key
        intermediates = chainPEM
        trustBundle = rootPEM.map(Self.terminated)
        self.maxLifetime = maxLifetime
        self.audit = audit
    }

    /// Signs `requestPEM` for `identity`, valid for `lifetime` (at most ``maxLifetime``).
    /// - Parameters:
    ///   - requester: who asked (recorded in the audit log).
    ///   - authorized: whether the requester may have this identity (the node hosts such a workload); checked
    ///     after the request itself, so a garbage request is reported as such.
    ///   - dnsNames: extra DNS SANs (the control plane's own serving certificate).
    ///   - cap: the longest lifetime allowed, instead of ``maxLifetime`` (the control plane's serving certificate,
    ///     which workloads' short lifetimes must not expire under its agents).
    public func sign(requestPEM: String, for identity: SPIFFEID, lifetime: Duration, requester: String,
                     authorized: Bool = true, dnsNames: [String] = [], cap: Duration? = nil,
                     now: Date = Date()) throws(SigningError) -> IssuedCertificate {
        do {
            let issued = try issue(requestPEM, identity, min(lifetime, cap ?? maxLifetime), requester, authorized, dnsNames, now)
            audit(AuditRecord(time: now, requester: requester, identity: identity.description, granted: true,
                              detail: "serial \(issued.serial) until \(issued.notAfter)"))
            return issued
        } catch {
            audit(AuditRecord(time: now, requester: requester, identity: identity.description, granted: false,
                              detail: error.description))
            throw error
        }
    }

    private func issue(_ requestPEM: String, _ identity: SPIFFEID, _ lifetime: Duration, _ requester: String,
                       _ authorized: Bool, _ dnsNames: [String], _ now: Date) throws(SigningError) -> IssuedCertificate {
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(pemEncoded: requestPEM)
        } catch CryptoKitError.incorrectParameterSize {
            // swift-crypto refuses RSA keys under 2048 bits while decoding the request's public key.
            throw .weakKey("RSA under 2048 bits")
        } catch {
            throw .malformedRequest(String(describing: error).prefix(200).description)
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else { throw .badRequestSignature }
        let publicKey = csr.publicKey
        guard Self.acceptable(publicKey) else { throw .weakKey(String(describing: publicKey).prefix(80).description) }
        guard identity.trustDomain == trustDomain else { throw .wrongTrustDomain(identity.trustDomain) }
        // A request may name its identity (as Istio's agents do); if it does, it must be the one being issued.
        let requested: [String]
        do {
            requested = try csr.attributes.extensionRequest?.extensions.subjectAlternativeNames?.compactMap {
                if case .uniformResourceIdentifier(let uri) = $0 { return uri }
                return nil
            } ?? []
        } catch {
            throw .malformedRequest("unreadable extension request")
        }
        if let other = requested.first(where: { $0 != identity.description }) {
            throw .identityMismatch(requested: other, issuing: identity.description)
        }
        guard authorized else { throw .notAuthorized(node: requester, identity: identity.description) }

        let seconds = lifetime.seconds
        // Backdated a little: clocks of nodes are never exactly together.
        let notBefore = now.addingTimeInterval(-60), notAfter = now.addingTimeInterval(seconds)
        let serial = Certificate.SerialNumber()
        do {
            let leaf = try Certificate(
                version: .v3, serialNumber: serial, publicKey: publicKey, notValidBefore: notBefore,
                notValidAfter: notAfter, issuer: certificate.subject, subject: DistinguishedName(),
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.notCertificateAuthority)
                    Critical(KeyUsage(digitalSignature: true, keyEncipherment: true))
                    try ExtendedKeyUsage([.serverAuth, .clientAuth])
                    // The identity is the SAN, as in Istio; the subject is empty, so the SAN is critical.
                    Critical(SubjectAlternativeNames([.uniformResourceIdentifier(identity.description)]
                                                     + dnsNames.map { .dnsName($0) }))
                    AuthorityKeyIdentifier(keyIdentifier: try certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
                },
                issuerPrivateKey: key)
            return IssuedCertificate(
                certificate: try Self.pem(leaf),
                chain: [try Self.pem(certificate)] + intermediates.map(Self.terminated),
                trustBundle: trustBundle, notAfter: notAfter,
                serial: serial.bytes.map { String($0, radix: 16) }.joined())
        } catch {
            throw .malformedRequest("could not be signed: \(error)")
        }
    }

    /// PEM ending in a newline, so that concatenated PEMs (a chain file) stay parseable.
    static func pem(_ c: Certificate) throws -> String { terminated(try c.serializeAsPEM().pemString) }

    static func terminated(_ pem: String) -> String { pem.hasSuffix("\n") ? pem : pem + "\n" }

    static func acceptable(_ key: Certificate.PublicKey) -> Bool {
        if P256.Signing.PublicKey(key) != nil || P384.Signing.PublicKey(key) != nil { return true }
        if let rsa = _RSA.Signing.PublicKey(key) { return rsa.keySizeInBits >= 2048 }
        return false
    }
}

/// A plug-in CA's files do not make a CA.
public struct CAFileError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}

extension Duration {
    var seconds: TimeInterval {
        let (s, atto) = components
        return TimeInterval(s) + TimeInterval(atto) / 1e18
    }
}
