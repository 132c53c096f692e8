import Foundation
import SluiceIdentity
import XCTest
@testable import SluiceControl

/// A deleted node's certificate renews nothing until the node joins again with a new token, and the deletion holds
/// across a restart of the control plane (the list is read back from its file).
final class NodeDeletionTests: XCTestCase {
    func testADeletedNodeRenewsNothingUntilItJoinsAgain() throws {
        let dir = NSTemporaryDirectory() + "sluice-deleted-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = "\(dir)/deleted-nodes"
        let ca = try CertificateAuthority(generatingRootFor: "cluster.local")
        let node = SPIFFEID(trustDomain: "cluster.local", namespace: CAService.nodeNamespace, serviceAccount: "n1")
        let csr = try WorkloadKey().signingRequest(for: node)

        func service(_ deleted: DeletedNodes) -> CAService {
            CAService(ca: ca, joinTokens: ["first": "n1", "second": "n1", "spoilt": "n1"], hostedIdentities: [:], deletedNodes: deleted)
        }
        func body(_ fields: [String: String]) throws -> Data { try JSONSerialization.data(withJSONObject: fields) }
        func renew(_ s: CAService) throws -> CAService.Response {
            s.handle(method: "POST", path: "/v1/certificates", body: try body(["identity": node.description, "csr": csr]),
                     peer: node.description)
        }

        var deleted = try DeletedNodes(path: file)
        var ca1 = service(deleted)
        XCTAssertEqual(ca1.handle(method: "POST", path: "/v1/join", body: try body(["token": "first", "node": "n1", "csr": csr]),
                                  peer: nil).status, 200)
        XCTAssertEqual(try renew(ca1).status, 200)

        XCTAssertTrue(try deleted.insert("n1"))
        XCTAssertFalse(try deleted.insert("n1"), "deleted twice")
        let refused = try renew(ca1)
        XCTAssertEqual(refused.status, 403)
        XCTAssertTrue(refused.body.contains("node_deleted") && refused.body.contains("join it again"), refused.body)
        XCTAssertEqual(ca1.counts["node_deleted"], 1)

        // A restart reads the deletion back; the old certificate is still refused.
        deleted = try DeletedNodes(path: file)
        XCTAssertTrue(deleted.contains("n1"))
        ca1 = service(deleted)
        XCTAssertEqual(try renew(ca1).status, 403)

        // A join that fails (here a CSR that does not parse) spends its token and brings the old certificate back to
        // nothing.
        XCTAssertEqual(ca1.handle(method: "POST", path: "/v1/join", body: try body(["token": "spoilt", "node": "n1", "csr": "junk"]),
                                  peer: nil).status, 400)
        XCTAssertEqual(try renew(ca1).status, 403, "a failed join un-deleted the node")

        // Joining again with a new token makes it a member once more, also for the next restart.
        XCTAssertEqual(ca1.handle(method: "POST", path: "/v1/join", body: try body(["token": "second", "node": "n1", "csr": csr]),
                                  peer: nil).status, 200)
        XCTAssertEqual(try renew(ca1).status, 200)
        XCTAssertFalse(try DeletedNodes(path: file).contains("n1"))

        // An unreadable list is an error, not an empty one (that would undo every deletion).
        try FileManager.default.removeItem(atPath: file)
        try FileManager.default.createDirectory(atPath: file, withIntermediateDirectories: false)
        XCTAssertThrowsError(try DeletedNodes(path: file))
    }
}
