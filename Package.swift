// swift-tools-version:6.0
import PackageDescription

// Data-plane modules (SluiceRing, SluiceProxy, SluiceTelemetry) stay free of NIO: they run on io_uring
// worker threads. NIO serves only control-path HTTP (metrics, readiness, admin) in SluiceAgent.
// Modules the request path calls into: their generic code (HTTP1Reader<Head>, metric shards) is specialized and
// inlined into SluiceProxy instead of running through runtime generic metadata on every request.
let hotPath: [SwiftSetting] = [.unsafeFlags(["-cross-module-optimization"])]
/// Thread-confined worker code: each object is touched by one worker thread only, so the runtime's dynamic
/// exclusivity checks cost CPU for nothing there (3% of an HTTP/1.1 request, 2% of an HTTP/2 one). Debug builds
/// and tests keep them.
let workerCode: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "sluice",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "sluice", targets: ["sluice"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.1.0"),
        // The control plane's embedded store (SQLite).
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        // The agent stream (and later Envoy's ext_authz and rate-limit protocols): gRPC over HTTP/2 on NIO.
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    ],
    targets: [
        .target(
            name: "CSluiceLinux",
            linkerSettings: [
                .linkedLibrary("uring"),
                .linkedLibrary("bpf"),
                .linkedLibrary("ssl"),
                .linkedLibrary("crypto"),
                .linkedLibrary("nghttp2"),
            ]
        ),
        // libyaml's event parser, read by SluiceModel's own tree builder (Yams' Node tree cost half the decode time).
        .systemLibrary(name: "CLibYAML", pkgConfig: "yaml-0.1", providers: [.apt(["libyaml-dev"])]),
        .target(name: "SluiceModel", dependencies: ["CLibYAML"]),
        // HTTP/1.1 parsing and body framing (pure Swift) and HTTP/2 sessions on libnghttp2; no I/O (the L7 wire layer).
        .target(name: "SluiceHTTP", dependencies: ["CSluiceLinux"], swiftSettings: hotPath + workerCode),
        .target(name: "SluiceTelemetry", dependencies: ["CSluiceLinux"], swiftSettings: hotPath),
        .target(name: "SluiceRing", dependencies: ["CSluiceLinux"], swiftSettings: hotPath),
        // TLS over memory BIOs (OpenSSL 3): the workers move the bytes on their rings. The only module that sees keys.
        .target(name: "SluiceTLS", dependencies: ["CSluiceLinux"]),
        // Identity: the mesh CA (X.509 with SPIFFE URI SANs) and workload keys; only this module sees the CA key.
        .target(
            name: "SluiceIdentity",
            dependencies: [
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ]
        ),
        .target(name: "SluiceBPF", dependencies: ["CSluiceLinux", "SluiceModel"]),
        .target(name: "SluiceProxy", dependencies: ["SluiceRing", "SluiceModel", "SluiceTelemetry", "SluiceHTTP", "SluiceTLS",
                                                    "SluiceIdentity", "CSluiceLinux"],
                swiftSettings: workerCode),
        // The agent stream's messages and gRPC service (generated from Proto/ by `make proto`, committed).
        .target(
            name: "SluiceProtocol",
            dependencies: [
                "SluiceModel",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            exclude: ["Proto"]
        ),
        .target(
            name: "SluiceAgent",
            dependencies: [
                "SluiceProxy", "SluiceModel", "SluiceTelemetry", "SluiceRing", "SluiceBPF", "SluiceHTTP", "SluiceTLS",
                "SluiceIdentity", "SluiceProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // `sluice control`: the CA service (and later the whole control plane), off the data plane, on NIO.
        .target(
            name: "SluiceControl",
            dependencies: [
                "SluiceIdentity", "SluiceModel", "SluiceTLS", "SluiceProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "X509", package: "swift-certificates"),
            ]
        ),
        .executableTarget(
            name: "sluice",
            dependencies: [
                "SluiceAgent", "SluiceModel", "SluiceControl", "SluiceIdentity",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "SluiceBench", dependencies: ["SluiceModel", "SluiceIdentity"], path: "Benchmarks/SluiceBench"),
        // `make bench-control`: the control plane at mesh scale with simulated agents (real stream clients).
        .executableTarget(
            name: "ControlBench",
            dependencies: [
                "SluiceModel", "SluiceIdentity", "SluiceProtocol", "SluiceTLS",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            ],
            path: "Benchmarks/ControlBench"),
        .testTarget(name: "SluiceModelTests", dependencies: ["SluiceModel", "SluiceTestSupport"]),
        .testTarget(name: "SluiceTelemetryTests", dependencies: ["SluiceTelemetry"]),
        .testTarget(name: "SluiceControlTests", dependencies: [
            "SluiceControl", "SluiceModel", "SluiceProtocol", "SluiceIdentity", "SluiceTestSupport",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        ]),
        .testTarget(name: "SluiceHTTPTests", dependencies: ["SluiceHTTP"]),
        .target(name: "SluiceTestSupport", dependencies: ["SluiceTLS", .product(name: "Crypto", package: "swift-crypto")],
                path: "Tests/SluiceTestSupport"),
        .testTarget(name: "SluiceTLSTests", dependencies: ["SluiceTLS", "SluiceTestSupport"]),
        .testTarget(name: "SluiceIdentityTests", dependencies: [
            "SluiceIdentity", "SluiceTLS", "SluiceTestSupport",
            .product(name: "Crypto", package: "swift-crypto"), .product(name: "_CryptoExtras", package: "swift-crypto"),
        ]),
        .testTarget(name: "SluiceBPFTests", dependencies: ["SluiceBPF", "SluiceModel", "CSluiceLinux"]),
        .testTarget(name: "SluiceProxyTests", dependencies: ["SluiceProxy", "SluiceModel", "SluiceRing", "SluiceHTTP"]),
        .testTarget(
            name: "SluiceIntegrationTests",
            dependencies: ["SluiceProxy", "SluiceModel", "SluiceRing", "SluiceTelemetry", "SluiceAgent", "SluiceBPF",
                           "SluiceIdentity", "SluiceTestSupport", "SluiceTLS"]
        ),
    ]
)
