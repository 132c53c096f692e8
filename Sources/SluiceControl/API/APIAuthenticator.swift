import Foundation
import SluiceModel

/// Who may use the config API: bearer tokens from `--tokens FILE` (and the admin token made at first start), and
/// mesh mTLS client certificates whose SPIFFE ID the file grants a role.
///
/// The file has Kubernetes' static token layout, one grant a line: `TOKEN,NAME,ROLE`, where ROLE is `admin`
/// (every verb) or `view` (get, list, watch); a first field that starts with `spiffe://` grants that certificate
/// identity instead of a token. `#` starts a comment.
public struct APIAuthenticator: Sendable {
    public enum Role: String, Sendable { case admin, view }

    public struct User: Sendable, Equatable {
        public var name: String
        /// nil: authenticated (a mesh certificate) but granted nothing.
        public var role: Role?
    }

    var tokens: [String: User] = [:]
    var identities: [String: User] = [:]

    public init() {}

    /// Reads a tokens file; the error names the line.
    public init(file path: String) throws {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw StoreError("cannot read \(path): \(error.localizedDescription)")
        }
        try self.init(text: text, file: path)
    }

    init(text: String, file: String) throws {
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let fields = line.split(separator: ",", omittingEmptySubsequences: false).map {
                $0.trimmingCharacters(in: .whitespaces)
            }
            guard fields.count == 3, !fields[0].isEmpty, !fields[1].isEmpty else {
                throw StoreError("\(file):\(n + 1): expected TOKEN,NAME,ROLE")
            }
            guard let role = Role(rawValue: fields[2]) else {
                throw StoreError("\(file):\(n + 1): role '\(fields[2])' is neither admin nor view")
            }
            add(fields[0], User(name: fields[1], role: role))
        }
    }

    public mutating func add(_ credential: String, _ user: User) {
        if credential.hasPrefix("spiffe://") { identities[credential] = user } else { tokens[credential] = user }
    }

    /// The user a request authenticates as: by its bearer token, else its verified client certificate; nil when
    /// it presents neither (or an unknown token).
    func authenticate(authorization: String?, peer: String?) -> User? {
        if let a = authorization {
            guard a.lowercased().hasPrefix("bearer ") else { return nil }
            let token = a.dropFirst("bearer ".count).trimmingCharacters(in: .whitespaces)
            return tokens[token]
        }
        if let peer { return identities[peer] ?? User(name: peer, role: nil) }
        return nil
    }

    /// A fresh random token (256 bits, hex).
    public static func newToken() -> String {
        var g = SystemRandomNumberGenerator()
        return (0..<4).map { _ in String(format: "%016llx", g.next() as UInt64) }.joined()
    }
}
