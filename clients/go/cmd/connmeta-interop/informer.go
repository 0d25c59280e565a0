package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// partition is a dialer whose connections the case can cut, and whose
// dials fail while cut: the informer's connection goes down for as long as
// the case needs to push its resume revision out of the history.
type partition struct {
	mu    sync.Mutex
	down  bool
	conns []net.Conn
}

func (p *partition) dial(ctx context.Context, address string) (net.Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return nil, errors.New("partitioned by the case")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", address)
	if err == nil {
		p.conns = append(p.conns, c)
	}
	return c, err
}

func (p *partition) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
}

func (p *partition) heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
}

// handlerModel rebuilds the records from the informer's handler calls
// alone, checking each call against what came before, and files the calls
// of the current phase.
type handlerModel struct {
	mu         sync.Mutex
	state      map[string]*connmetav1.ConnectionRecord
	violations []string
	adds       []string
	updates    map[string]*connmetav1.ConnectionRecord // id -> new
	deletes    []string                                // live DELETED events
	tombstones []string                                // deletes seen only in a relist
	relists    []connmeta.Listing
}

func newHandlerModel() *handlerModel {
	m := &handlerModel{state: map[string]*connmetav1.ConnectionRecord{}}
	m.nextPhase()
	return m
}

// nextPhase forgets the calls filed so far (not the state).
func (m *handlerModel) nextPhase() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.adds, m.updates, m.deletes, m.tombstones, m.relists = nil, map[string]*connmetav1.ConnectionRecord{}, nil, nil, nil
}

func (m *handlerModel) OnAdd(rec *connmetav1.ConnectionRecord) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := connID(rec)
	if _, ok := m.state[id]; ok {
		m.violations = append(m.violations, "OnAdd of "+id+", which was there")
	}
	m.state[id] = rec
	m.adds = append(m.adds, id)
}

func (m *handlerModel) OnUpdate(old, new *connmetav1.ConnectionRecord) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := connID(new)
	if held, ok := m.state[id]; !ok || !proto.Equal(held, old) {
		m.violations = append(m.violations, "OnUpdate of "+id+" whose old version is not the one added or updated last")
	}
	m.state[id] = new
	m.updates[id] = new
}

func (m *handlerModel) OnDelete(obj any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, tombstone := connmeta.DeletedRecord(obj)
	if rec == nil {
		m.violations = append(m.violations, fmt.Sprintf("OnDelete of a %T", obj))
		return
	}
	id := connID(rec)
	held, ok := m.state[id]
	switch {
	case !ok:
		m.violations = append(m.violations, "OnDelete of "+id+", which was not there")
	case tombstone && !proto.Equal(held, rec):
		m.violations = append(m.violations, "a tombstone of "+id+" that is not the last version delivered")
	}
	delete(m.state, id)
	if tombstone {
		m.tombstones = append(m.tombstones, id)
	} else {
		m.deletes = append(m.deletes, id)
	}
}

// sortedIDs returns ids sorted, for comparisons.
func sortedIDs(ids ...string) []string {
	out := slices.Clone(ids)
	sort.Strings(out)
	return out
}

// check compares the phase's calls with what was expected; updated lists
// ids that must have had an OnUpdate (others may too only if mayUpdate).
func (m *handlerModel) check(phase string, adds, updated, deletes, tombstones []string, exactUpdates bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var diffs []string
	if len(m.violations) > 0 {
		diffs = append(diffs, "handler calls out of line: "+strings.Join(m.violations, "; "))
	}
	cmpSet := func(what string, got, want []string) {
		if !slices.Equal(sortedIDs(got...), sortedIDs(want...)) {
			diffs = append(diffs, fmt.Sprintf("%s %v, want %v", what, sortedIDs(got...), sortedIDs(want...)))
		}
	}
	cmpSet("OnAdd", m.adds, adds)
	cmpSet("OnDelete (DELETED event)", m.deletes, deletes)
	cmpSet("OnDelete (DeletedFinalStateUnknown)", m.tombstones, tombstones)
	var gotUpdates []string
	for id := range m.updates {
		gotUpdates = append(gotUpdates, id)
	}
	for _, id := range updated {
		if _, ok := m.updates[id]; !ok {
			diffs = append(diffs, "no OnUpdate of "+id)
		}
	}
	if exactUpdates {
		cmpSet("OnUpdate", gotUpdates, updated)
	}
	if len(diffs) > 0 {
		return fmt.Errorf("%s: %s", phase, strings.Join(diffs, "; "))
	}
	return nil
}

// converge waits until the informer's store, the handlers' model and a
// fresh listing are the same records.
func converge(ctx context.Context, phase string, c *connmeta.Client, inf *connmeta.Informer, m *handlerModel, filter *connmetav1.ConnectionFilter, clientID string) error {
	want, _, err := c.ListAll(ctx, &connmetav1.ListConnectionsRequest{Filter: filter})
	if err != nil {
		return fmt.Errorf("%s: %w", phase, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		store := map[string]*connmetav1.ConnectionRecord{}
		for _, r := range inf.List() {
			store[connID(r)] = r
		}
		m.mu.Lock()
		model := cloneState(m.state)
		m.mu.Unlock()
		d1, d2 := stateDiff(store, want), stateDiff(model, want)
		if d1 == "" && d2 == "" {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: after 10 s the informer's store differs from the listing (%s) or its handler calls do (%s)", phase, d1, d2)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The index by client id holds the same records (all are this
	// client's), and every server is found under its host.
	if byClient := inf.ByIndex(connmeta.IndexClientID, clientID); len(byClient) != len(want) {
		return fmt.Errorf("%s: ByIndex(client_id) has %d records, the listing %d", phase, len(byClient), len(want))
	}
	for _, r := range want {
		if h := r.GetServer().GetAddress().GetHost(); h != "" &&
			!slices.ContainsFunc(inf.ByIndex(connmeta.IndexServerHost, h), func(x *connmetav1.ConnectionRecord) bool { return proto.Equal(x, r) }) {
			return fmt.Errorf("%s: ByIndex(server_host, %s) lacks %s", phase, h, connID(r))
		}
	}
	return nil
}

func cloneState(m map[string]*connmetav1.ConnectionRecord) map[string]*connmetav1.ConnectionRecord {
	out := make(map[string]*connmetav1.ConnectionRecord, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// openServer is an OPEN server of clientID; host names it in the index.
func openServer(id, clientID string, port uint32) *connmetav1.ConnectionSnapshot {
	return serverSnapshot(id, clientID, open, "informer.example", port)
}

// closedServer reports a server that disconnected: it leaves the
// informer's filter (OPEN only), which the watch shows as DELETED.
func closedServer(id, clientID string, port uint32) *connmetav1.ConnectionSnapshot {
	s := serverSnapshot(id, clientID, closed, "informer.example", port)
	s.Hook = connmetav1.Hook_HOOK_SERVER_DISCONNECTED
	return s
}

func caseInformerConverges(ctx context.Context, e *env) error {
	clientID := newID()
	s := make([]string, 10)
	for i := range s {
		s[i] = newID()
	}
	snaps := []*connmetav1.ConnectionSnapshot{clientSnapshot(clientID)}
	for _, id := range s[:6] {
		snaps = append(snaps, openServer(id, clientID, 443))
	}
	if _, err := e.proxy.report(snaps...); err != nil {
		return err
	}
	// The informer of the client's OPEN connections: a server that closes
	// leaves it (a delete).
	filter := &connmetav1.ConnectionFilter{ClientId: clientID, States: []connmetav1.ConnectionState{open}}
	var cut partition
	consumer, err := connmeta.Dial(e.target, append(slices.Clone(e.dial), connmeta.WithDialOptions(grpc.WithContextDialer(cut.dial)))...)
	if err != nil {
		return err
	}
	defer consumer.Close()
	m := newHandlerModel()
	inf := connmeta.NewInformer(consumer, connmeta.InformerOptions{
		Filter:     filter,
		MaxBackoff: 500 * time.Millisecond,
		OnRelist: func(l connmeta.Listing) {
			m.mu.Lock()
			defer m.mu.Unlock()
			m.relists = append(m.relists, l)
		},
	})
	inf.AddEventHandler(m)
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- inf.Run(runCtx) }()
	syncCtx, cancelSync := context.WithTimeout(ctx, 5*time.Second)
	defer cancelSync()
	if err := inf.WaitForSync(syncCtx); err != nil {
		return fmt.Errorf("WaitForSync: %w", err)
	}
	if err := converge(ctx, "first listing", e.client, inf, m, filter, clientID); err != nil {
		return err
	}
	if err := m.check("first listing", append([]string{clientID}, s[:6]...), nil, nil, nil, true); err != nil {
		return err
	}

	// Phase 1, watched live: two new servers, two changed, one closed.
	m.nextPhase()
	if _, err := e.proxy.report(openServer(s[6], clientID, 443), openServer(s[7], clientID, 443)); err != nil {
		return err
	}
	if _, err := e.proxy.report(openServer(s[1], clientID, 8443), openServer(s[2], clientID, 8443)); err != nil {
		return err
	}
	if _, err := e.proxy.report(closedServer(s[3], clientID, 443)); err != nil {
		return err
	}
	if err := converge(ctx, "live churn", e.client, inf, m, filter, clientID); err != nil {
		return err
	}
	if err := m.check("live churn", s[6:8], s[1:3], s[3:4], nil, true); err != nil {
		return err
	}

	// Phase 2, while the informer is cut off: one new, one changed, two
	// closed, one that came and went unseen, then more writes than the
	// history (--history-size 64) holds, so its resume revision is
	// compacted away and it must relist.
	m.nextPhase()
	cut.cut()
	if _, err := e.proxy.report(openServer(s[8], clientID, 443), openServer(s[4], clientID, 9443),
		closedServer(s[5], clientID, 443), closedServer(s[6], clientID, 443)); err != nil {
		return err
	}
	if _, err := e.proxy.report(openServer(s[9], clientID, 443)); err != nil {
		return err
	}
	if _, err := e.proxy.report(closedServer(s[9], clientID, 443)); err != nil {
		return err
	}
	otherClient, filler := newID(), newID()
	for i := range 80 {
		if _, err := e.proxy.report(serverSnapshot(filler, otherClient, closed, "filler.example", uint32(1000+i))); err != nil {
			return err
		}
	}
	cut.heal()
	if err := converge(ctx, "relist after compaction", e.client, inf, m, filter, clientID); err != nil {
		return err
	}
	if err := m.check("relist after compaction", s[8:9], s[4:5], nil, []string{s[5], s[6]}, true); err != nil {
		return err
	}
	if err := m.relistedFor(connmeta.RelistCompacted); err != nil {
		return err
	}

	// Phase 3: the sidecar restarts (kill -9, a new empty store). The
	// proxy reconnects and reports what is still open: s4 and s7 closed
	// while the sidecar was down, s1 changed.
	m.nextPhase()
	if err := restartServer(); err != nil {
		return err
	}
	waitCtx, cancelWait := context.WithTimeout(ctx, 5*time.Second)
	defer cancelWait()
	if _, err := e.client.Health.Check(waitCtx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		return fmt.Errorf("the restarted server is not reachable: %w", err)
	}
	p, err := newProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer p.close()
	survivors := []string{clientID, s[0], s[1], s[2], s[8]}
	if _, err := p.report(clientSnapshot(clientID), openServer(s[0], clientID, 443), openServer(s[1], clientID, 7443),
		openServer(s[2], clientID, 8443), openServer(s[8], clientID, 443)); err != nil {
		return err
	}
	if err := converge(ctx, "relist after the restart", e.client, inf, m, filter, clientID); err != nil {
		return err
	}
	// Every survivor is a new version (new revisions, etags): an update.
	if err := m.check("relist after the restart", nil, survivors, nil, []string{s[4], s[7]}, true); err != nil {
		return err
	}
	if err := m.relistedFor(connmeta.RelistRestarted); err != nil {
		return err
	}
	stop()
	if err := <-done; !errors.Is(err, context.Canceled) {
		return fmt.Errorf("Informer.Run ended with %v, want it running until stopped", err)
	}
	return nil
}

// relistedFor checks that the phase had a relist with this cause.
func (m *handlerModel) relistedFor(cause connmeta.RelistCause) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, l := range m.relists {
		if l.Cause == cause {
			return nil
		}
	}
	causes := make([]string, len(m.relists))
	for i, l := range m.relists {
		causes[i] = l.Cause.String()
	}
	return fmt.Errorf("the informer was told of relists %v, want one caused %q", causes, cause)
}
