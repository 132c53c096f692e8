import Crypto
import Foundation
import SwiftASN1
import X509

/// A workload's key pair and its certificate signing request, made where the workload runs (the agent): the
/// private key never leaves the node.
public struct WorkloadKey: Sendable {
    let key: Certificate.PrivateKey

    public init() { key = Certificate.PrivateKey(P256.Signing.PrivateKey()) }

    /// The private key, PEM (written by the agent to a 0600 file for the TLS layer, never sent).
    public var privateKeyPEM: String { get throws { try key.serializeAsPEM().pemString } }

    /// A PKCS#10 request naming `identity` as its URI SAN.
    public func signingRequest(for identity: SPIFFEID) throws -> String {
        let extensions = try Certificate.Extensions {
            SubjectAlternativeNames([.uniformResourceIdentifier(identity.description)])
        }
        let csr = try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName(), privateKey: key,
            attributes: CertificateSigningRequest.Attributes([.init(ExtensionRequest(extensions: extensions))]),
            signatureAlgorithm: .ecdsaWithSHA256)
        return try csr.serializeAsPEM().pemString
    }
}

/// What the agent needs to know of a certificate it holds: when it is valid and whom it names.
public struct CertificateInfo: Sendable, Equatable {
    public var notBefore: Date
    public var notAfter: Date
    public var uris: [String]
    /// The serial number in hex, as `openssl x509 -serial` prints it.
    public var serialNumber: String

    /// Reads the first certificate of a PEM file's contents.
    public init(pem: String) throws {
        guard let end = pem.range(of: "-----END CERTIFICATE-----") else { throw CAFileError("no certificate in the PEM") }
        let cert = try Certificate(pemEncoded: String(pem[..<end.upperBound]))
        notBefore = cert.notValidBefore
        notAfter = cert.notValidAfter
        serialNumber = cert.serialNumber.bytes.map { String(format: "%02X", $0) }.joined()
        uris = (try cert.extensions.subjectAlternativeNames)?.compactMap {
            if case .uniformResourceIdentifier(let u) = $0 { return u }
            return nil
        } ?? []
    }
}
