package main

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
)

// pingCounter counts the HTTP/2 PING frames (not PING acks) the client
// writes, by following the frame headers of the outgoing byte stream. It
// lets the keepalive case prove that pings were really sent, so that "the
// connection survived" is not true merely because nothing pinged.
type pingCounter struct {
	pings atomic.Int64

	mu       sync.Mutex
	preface  int    // bytes of the client connection preface still to skip
	header   []byte // partial frame header
	skipBody int    // payload bytes of the current frame still to skip
}

const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

func (p *pingCounter) observe(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(b) > 0 {
		switch {
		case p.preface > 0:
			n := min(p.preface, len(b))
			p.preface -= n
			b = b[n:]
		case p.skipBody > 0:
			n := min(p.skipBody, len(b))
			p.skipBody -= n
			b = b[n:]
		default:
			n := min(9-len(p.header), len(b))
			p.header = append(p.header, b[:n]...)
			b = b[n:]
			if len(p.header) == 9 {
				length := int(p.header[0])<<16 | int(p.header[1])<<8 | int(p.header[2])
				const typePing, flagAck = 0x6, 0x1
				if p.header[3] == typePing && p.header[4]&flagAck == 0 {
					p.pings.Add(1)
				}
				p.skipBody = length
				p.header = p.header[:0]
			}
		}
	}
}

type countingConn struct {
	net.Conn
	counter *pingCounter
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.counter.observe(b[:n])
	return n, err
}

// countingDialer dials target's network (unix for unix: targets, else tcp)
// and counts the pings written on the connection.
func countingDialer(target string, counter *pingCounter) grpc.DialOption {
	network := "tcp"
	if strings.HasPrefix(target, "unix:") {
		network = "unix"
	}
	return grpc.WithContextDialer(func(ctx context.Context, address string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, address)
		if err != nil {
			return nil, err
		}
		counter.mu.Lock()
		counter.preface = len(http2Preface)
		counter.header, counter.skipBody = nil, 0
		counter.mu.Unlock()
		return countingConn{conn, counter}, nil
	})
}
