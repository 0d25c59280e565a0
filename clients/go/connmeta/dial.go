package connmeta

import (
	"crypto/tls"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// DefaultKeepalive is how long a connection may be silent before the client
// pings the sidecar. Watches sit idle for long stretches; without pings a
// dead peer or a NAT/L4 balancer that dropped the flow goes unnoticed until
// the next write. The sidecar permits pings this often (its
// keepalive-min-ping-interval is lower), so they do not earn a GOAWAY
// "too_many_pings".
const DefaultKeepalive = 20 * time.Second

// Client is a connection to one connmeta sidecar. It is safe for concurrent
// use; share one per process.
type Client struct {
	conn *grpc.ClientConn
	// Connections is the raw ConnectionService stub, for anything the
	// helpers do not cover.
	Connections connmetav1.ConnectionServiceClient
	// Reports is the raw ReportService stub (the proxy's side).
	Reports connmetav1.ReportServiceClient
	// Health is the standard grpc.health.v1 service.
	Health healthpb.HealthClient
}

// DialOptions is everything [Dial] can be told. Options set its fields;
// an Option of your own is a func(*DialOptions) like the ones here.
type DialOptions struct {
	// Keepalive is the keepalive ping interval ([DefaultKeepalive] unless
	// set). grpc-go never pings more often than every 10 s.
	Keepalive time.Duration
	// TLS, for TCP targets: mutual TLS with these files (see [WithTLS]).
	TLS *TLSFiles
	// TLSConfig, for TCP targets, is used as is; it takes precedence over
	// TLS.
	TLSConfig *tls.Config
	// GRPC are raw grpc dial options, applied after connmeta's own, so
	// credentials given here replace the transport chosen above and
	// interceptors given here run inside connmeta's (they see the original
	// status errors).
	GRPC []grpc.DialOption
}

// Option configures [Dial]: a function that sets fields of [DialOptions].
type Option func(*DialOptions)

// WithKeepalive sets the keepalive ping interval. grpc-go never pings more
// often than every 10 s, whatever is asked.
func WithKeepalive(d time.Duration) Option {
	return func(o *DialOptions) { o.Keepalive = d }
}

// WithDialOptions appends raw grpc dial options (TLS credentials, a custom
// dialer, interceptors). Later options override earlier ones, so
// credentials given here replace the default insecure transport.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *DialOptions) { o.GRPC = append(o.GRPC, opts...) }
}

// WithTLS makes a TCP target use mutual TLS: the sidecar's certificate is
// verified against the CA in caFile (PEM), and certFile/keyFile (PEM) are
// the client certificate the sidecar verifies against its --client-ca and
// authorizes by (its SPIFFE URI SAN, else DNS SANs, else subject). With
// certFile and keyFile empty no client certificate is sent, which a
// sidecar run with --client-ca refuses in the handshake. Unix-socket
// targets ignore this option: the socket's file permissions are their
// access control, and they stay plaintext.
//
// The files are read once by Dial (a missing or malformed file fails Dial)
// and the client certificate again at every new connection, so a
// certificate rotated on disk (cert-manager, `connmeta certs init` rerun)
// is used from the next reconnect on without a new Dial.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(o *DialOptions) { o.TLS = &TLSFiles{CA: caFile, Cert: certFile, Key: keyFile} }
}

// WithTLSFiles is [WithTLS] with a server name to verify other than the
// target's host (e.g. dialing an IP whose certificate names only DNS).
func WithTLSFiles(files TLSFiles) Option {
	return func(o *DialOptions) { o.TLS = &files }
}

// WithTLSConfig uses cfg as is for TCP targets, for anything [WithTLS]
// does not cover. It takes precedence over WithTLS.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(o *DialOptions) { o.TLSConfig = cfg }
}

// Dial connects to a sidecar. target is "host:port" (TCP) or
// "unix:///absolute/path" (Unix socket, the usual way inside a pod); any
// target grpc-go understands works. The connection is made lazily, on the
// first call, so Dial fails only on a malformed target.
//
// Without [WithTLS] the transport is plaintext: fine for the Unix socket
// (its file mode is the access control) and for reading from a sidecar on
// loopback; a sidecar without an authorization policy lets plaintext TCP
// callers only read, and one run with --client-ca accepts TCP callers only
// with a client certificate.
func Dial(target string, opts ...Option) (*Client, error) {
	cfg := DialOptions{Keepalive: DefaultKeepalive}
	for _, o := range opts {
		o(&cfg)
	}
	creds := insecure.NewCredentials()
	if !isUnix(target) {
		tlsCfg := cfg.TLSConfig
		if tlsCfg == nil && cfg.TLS != nil {
			var err error
			if tlsCfg, err = cfg.TLS.Config(); err != nil {
				return nil, fmt.Errorf("connmeta: dial %q: %w", target, err)
			}
		}
		if tlsCfg != nil {
			creds = credentials.NewTLS(tlsCfg)
		}
	}
	dialOpts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:    cfg.Keepalive,
			Timeout: 10 * time.Second,
			// Ping only while an RPC is open: that is when a dead peer
			// costs something (a watch that silently stops), and a server
			// with gRPC's default policy would GOAWAY pings on an idle
			// connection.
			PermitWithoutStream: false,
		}),
		// The sidecar is local and restarts in seconds (crash, OOM,
		// upgrade): reconnect soon after it is back. gRPC's default
		// backoff (1 s growing to 120 s) would leave watches down for
		// minutes after a restart that took ten seconds.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: grpcbackoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   5 * time.Second,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
		// Every error a stub returns becomes a *StatusError, so that
		// errors.Is(err, ErrNotFound) works on raw calls too.
		grpc.WithChainUnaryInterceptor(unaryStatusErrors),
		grpc.WithChainStreamInterceptor(streamStatusErrors),
	}
	dialOpts = append(dialOpts, cfg.GRPC...)
	conn, err := grpc.NewClient(target, dialOpts...)
	if err != nil {
		return nil, fmt.Errorf("connmeta: dial %q: %w (want host:port or unix:///path)", target, err)
	}
	return &Client{
		conn:        conn,
		Connections: connmetav1.NewConnectionServiceClient(conn),
		Reports:     connmetav1.NewReportServiceClient(conn),
		Health:      healthpb.NewHealthClient(conn),
	}, nil
}

// Conn returns the underlying connection, e.g. to build other stubs on it.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Close tears the connection down; calls in flight fail with Canceled.
func (c *Client) Close() error { return c.conn.Close() }

// isUnix tells the Unix-socket targets of gRPC's naming rules apart.
func isUnix(target string) bool {
	return strings.HasPrefix(target, "unix:") || strings.HasPrefix(target, "unix-abstract:")
}
