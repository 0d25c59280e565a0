package connmeta

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// mtlsFake is a TLS fake with a reader and a writer client certificate,
// plus a certificate of another CA.
func mtlsFake(t *testing.T) (target string, p *testPKI, principals chan string) {
	t.Helper()
	dir := t.TempDir()
	p, err := newTestPKI(dir, "ca")
	if err != nil {
		t.Fatal(err)
	}
	for _, leaf := range []struct{ name, uri string }{
		{"server", ""}, {"reader", "spiffe://connmeta.local/reader"}, {"writer", "spiffe://connmeta.local/writer"},
	} {
		if err := p.issue(leaf.name, leaf.uri, leaf.name == "server"); err != nil {
			t.Fatal(err)
		}
	}
	principals = make(chan string, 16)
	target, stop, err := startTLSFake(&fakeServer{revision: 100}, p, principals)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return target, p, principals
}

func getUnknown(t *testing.T, c *Client) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := c.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{Id: "nope"})
	return err
}

func TestDialWithTLSPresentsTheClientCertificate(t *testing.T) {
	target, p, principals := mtlsFake(t)
	c, err := Dial(target, WithTLS(p.path("ca.pem"), p.path("reader.pem"), p.path("reader.key")))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := getUnknown(t, c); status.Code(err) != codes.NotFound {
		t.Fatalf("GetConnection over mTLS: %v, want the fake's NotFound", err)
	}
	if got := <-principals; got != "spiffe://connmeta.local/reader" {
		t.Fatalf("the server saw client URI %q", got)
	}
}

func TestDialWithTLSWithoutClientCertificateFailsTheHandshake(t *testing.T) {
	target, p, _ := mtlsFake(t)
	c, err := Dial(target, WithTLS(p.path("ca.pem"), "", ""))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := getUnknown(t, c); status.Code(err) != codes.Unavailable {
		t.Fatalf("no client certificate: %v, want Unavailable", err)
	}
}

func TestDialWithTLSRefusesAServerOfAnotherCA(t *testing.T) {
	target, p, _ := mtlsFake(t)
	other, err := newTestPKI(t.TempDir(), "ca")
	if err != nil {
		t.Fatal(err)
	}
	c, err := Dial(target, WithTLS(other.path("ca.pem"), p.path("reader.pem"), p.path("reader.key")))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = getUnknown(t, c)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("server of another CA: %v, want Unavailable naming the certificate", err)
	}
}

func TestDialWithTLSFailsAtOnceOnAMissingOrHalfGivenFile(t *testing.T) {
	_, p, _ := mtlsFake(t)
	for _, files := range []TLSFiles{
		{CA: p.path("missing.pem")},
		{CA: p.path("ca.pem"), Cert: p.path("reader.pem"), Key: p.path("missing.key")},
		{CA: p.path("ca.pem"), Cert: p.path("reader.pem")},
		{CA: p.path("reader.key")}, // no certificate in it
	} {
		if _, err := Dial("127.0.0.1:1", WithTLSFiles(files)); err == nil {
			t.Errorf("Dial with %+v succeeded", files)
		}
	}
}

func TestDialWithTLSLeavesUnixSocketsPlaintext(t *testing.T) {
	_, p, _ := mtlsFake(t)
	target, stop, err := startFake(&fakeServer{revision: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	c, err := Dial(target, WithTLS(p.path("ca.pem"), p.path("reader.pem"), p.path("reader.key")))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := getUnknown(t, c); status.Code(err) != codes.NotFound {
		t.Fatalf("Unix socket with TLS options: %v, want the fake's NotFound", err)
	}
}

func TestTLSConfigRereadsARotatedClientCertificate(t *testing.T) {
	_, p, _ := mtlsFake(t)
	cfg, err := TLSFiles{CA: p.path("ca.pem"), Cert: p.path("reader.pem"), Key: p.path("reader.key")}.Config()
	if err != nil {
		t.Fatal(err)
	}
	uriOf := func() string {
		t.Helper()
		cert, err := cfg.GetClientCertificate(nil)
		if err != nil {
			t.Fatal(err)
		}
		if cert.Leaf == nil || len(cert.Leaf.URIs) != 1 {
			t.Fatalf("certificate without one URI: %+v", cert.Leaf)
		}
		return cert.Leaf.URIs[0].String()
	}
	if got := uriOf(); got != "spiffe://connmeta.local/reader" {
		t.Fatalf("before rotation: %s", got)
	}
	// Rotate: the reader files now hold the writer's certificate.
	for _, ext := range []string{".pem", ".key"} {
		b, err := os.ReadFile(p.path("writer" + ext))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p.path("reader"+ext), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if got := uriOf(); got != "spiffe://connmeta.local/writer" {
		t.Fatalf("after rotation the next handshake still presents %s", got)
	}
}
