import CLibYAML

/// A YAML node as the resource decoders read it: scalars as text, mappings as ordered pairs, every node with its
/// 1-based line. Built straight from libyaml's events: no tags, no resolver, no per-node objects, which halves
/// decoding time against a general-purpose YAML library's tree.
indirect enum YAMLNode: Sendable {
    /// `plain`: written without quotes (so YAML's schema may read it as a number, a boolean or null).
    case scalar(String, line: Int, plain: Bool = true)
    case sequence([YAMLNode], line: Int)
    case mapping([YAMLPair], line: Int)

    var line: Int {
        switch self {
        case .scalar(_, let l, _), .sequence(_, let l), .mapping(_, let l): l
        }
    }

    var scalar: String? { if case .scalar(let s, _, _) = self { s } else { nil } }

    /// Nodes in this subtree, for the alias budget.
    var size: Int {
        switch self {
        case .scalar: 1
        case .sequence(let items, _): items.reduce(1) { $0 + $1.size }
        case .mapping(let pairs, _): pairs.reduce(1) { $0 + 1 + $1.value.size }
        }
    }
}

struct YAMLPair: Sendable {
    var key: String
    var keyLine: Int
    var value: YAMLNode
}

/// Why a YAML text could not be read, and where.
struct YAMLSyntaxError: Error {
    var line: Int?
    var message: String
}

enum YAMLTree {
    /// Deeper nesting than this is refused (no Istio resource comes close; deep input is an attack or a bug).
    static let maxDepth = 256
    /// Aliases may add at most this many nodes per document: enough for real reuse, a clear error for a
    /// "billion laughs" document.
    static let maxAliasNodes = 100_000

    /// Parses every document of `text` and hands each root to `body`, in order.
    static func documents(_ text: String, _ body: (YAMLNode) -> Void) throws(YAMLSyntaxError) {
        var text = text
        text.makeContiguousUTF8()
        let result: YAMLSyntaxError? = text.utf8.withContiguousStorageIfAvailable { bytes -> YAMLSyntaxError? in
            var parser = yaml_parser_t()
            guard yaml_parser_initialize(&parser) == 1 else { return YAMLSyntaxError(line: nil, message: "out of memory") }
            defer { yaml_parser_delete(&parser) }
            yaml_parser_set_input_string(&parser, bytes.baseAddress, bytes.count)
            var builder = Builder()
            while true {
                var event = yaml_event_t()
                guard yaml_parser_parse(&parser, &event) == 1 else {
                    let problem = parser.problem.map { String(cString: $0) } ?? "syntax error"
                    let context = parser.context.map { String(cString: $0) + ": " } ?? ""
                    return YAMLSyntaxError(line: Int(parser.problem_mark.line) + 1, message: context + problem)
                }
                defer { yaml_event_delete(&event) }
                if event.type == YAML_STREAM_END_EVENT { return nil }
                do throws(YAMLSyntaxError) {
                    if let root = try builder.take(&event) { body(root) }
                } catch {
                    return error
                }
            }
        } ?? YAMLSyntaxError(line: nil, message: "text is not contiguous UTF-8")
        if let result { throw result }
    }

    /// Turns events into nodes: a stack of open collections, anchors of the current document.
    private struct Builder {
        enum Open {
            case sequence([YAMLNode], line: Int, anchor: String?)
            /// `keys` is built once a mapping grows past a few keys, so duplicate checks stay linear overall.
            case mapping([YAMLPair], line: Int, anchor: String?, pendingKey: (String, Int)?, keys: Set<String>?)
        }
        var stack: [Open] = []
        var anchors: [String: (node: YAMLNode, size: Int)] = [:]
        var aliasNodes = 0
        var root: YAMLNode?

        /// Feeds one event; returns a document's root when the document ends.
        mutating func take(_ e: inout yaml_event_t) throws(YAMLSyntaxError) -> YAMLNode? {
            let line = Int(e.start_mark.line) + 1
            switch e.type {
            case YAML_DOCUMENT_START_EVENT:
                anchors = [:]
                aliasNodes = 0
                root = nil
            case YAML_DOCUMENT_END_EVENT:
                defer { root = nil }
                return root ?? .scalar("", line: line)
            case YAML_SCALAR_EVENT:
                let s = e.data.scalar
                let text = String(decoding: UnsafeBufferPointer(start: s.value, count: s.length), as: UTF8.self)
                try add(.scalar(text, line: line, plain: s.style == YAML_PLAIN_SCALAR_STYLE), anchor: Self.string(s.anchor))
            case YAML_SEQUENCE_START_EVENT:
                try push(.sequence([], line: line, anchor: Self.string(e.data.sequence_start.anchor)), line: line)
            case YAML_MAPPING_START_EVENT:
                try push(.mapping([], line: line, anchor: Self.string(e.data.mapping_start.anchor), pendingKey: nil,
                                  keys: nil), line: line)
            case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
                switch stack.removeLast() {
                case .sequence(let items, let l, let anchor): try add(.sequence(items, line: l), anchor: anchor)
                case .mapping(let pairs, let l, let anchor, _, _): try add(.mapping(pairs, line: l), anchor: anchor)
                }
            case YAML_ALIAS_EVENT:
                let name = Self.string(e.data.alias.anchor) ?? ""
                guard let (node, size) = anchors[name] else {
                    throw YAMLSyntaxError(line: line, message: "alias *\(name) names no anchor")
                }
                aliasNodes += size
                if aliasNodes > YAMLTree.maxAliasNodes {
                    throw YAMLSyntaxError(line: line,
                                          message: "aliases expand to more than \(YAMLTree.maxAliasNodes) nodes")
                }
                try add(node, anchor: nil)
            default: break
            }
            return nil
        }

        mutating func push(_ open: Open, line: Int) throws(YAMLSyntaxError) {
            guard stack.count < YAMLTree.maxDepth else {
                throw YAMLSyntaxError(line: line, message: "nesting is deeper than \(YAMLTree.maxDepth) levels")
            }
            stack.append(open)
        }

        mutating func add(_ node: YAMLNode, anchor: String?) throws(YAMLSyntaxError) {
            if let anchor { anchors[anchor] = (node, node.size) }
            guard let top = stack.popLast() else {
                root = node
                return
            }
            switch top {
            case .sequence(var items, let l, let a):
                items.append(node)
                stack.append(.sequence(items, line: l, anchor: a))
            case .mapping(var pairs, let l, let a, let pending, var keys):
                if let (key, keyLine) = pending {
                    pairs.append(YAMLPair(key: key, keyLine: keyLine, value: node))
                    stack.append(.mapping(pairs, line: l, anchor: a, pendingKey: nil, keys: keys))
                } else {
                    guard let key = node.scalar else {
                        throw YAMLSyntaxError(line: node.line, message: "mapping keys must be plain strings")
                    }
                    let duplicate: Bool
                    if keys != nil {
                        duplicate = !keys!.insert(key).inserted
                    } else {
                        duplicate = pairs.contains { $0.key == key }
                        if pairs.count >= 16 { keys = Set(pairs.map(\.key) + [key]) }
                    }
                    if duplicate { throw YAMLSyntaxError(line: node.line, message: "duplicated key(s): '\(key)'") }
                    stack.append(.mapping(pairs, line: l, anchor: a, pendingKey: (key, node.line), keys: keys))
                }
            }
        }

        static func string(_ p: UnsafeMutablePointer<yaml_char_t>?) -> String? {
            p.map { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
        }
    }
}
