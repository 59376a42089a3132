// Command ferretdb-server runs FerretDB (a MongoDB wire-protocol server) with its SQLite backend
// for the project's tests. It embeds the public github.com/FerretDB/FerretDB/ferretdb package,
// because `go install .../cmd/ferretdb` builds a binary that panics at start (missing version.txt).
//
// With -tls-listen it also listens with TLS (-tls-cert, -tls-key; no client certificate is asked
// for), in this process, with the same data as the open listener and no authentication.
//
// With -secure-bin it also runs a second FerretDB that demands TLS and SCRAM credentials, as a
// child process: SCRAM (createUser, saslStart with SCRAM-SHA-1/256, every command refused with
// code 13 until the connection authenticated) only exists behind the handler's EnableNewAuth,
// which the embedded package does not expose, and which applies to every listener of a handler,
// so the open listener could not stay open in the same process. The child is FerretDB's own
// cmd/ferretdb (scripts/servers builds it from the module zip the Go proxy serves, adding the
// version.txt it needs) started with --test-enable-new-auth, its own data directory, and a user
// made at its first start (--setup-*; the password comes in $FERRETDB_SETUP_PASSWORD, not on the
// command line). The child dies with this process: it is in the same process group (the signals
// of scripts/servers reach both), it is sent SIGTERM when this process stops, and SIGKILL by the
// kernel if this process dies first; if the child exits on its own, this process exits too, so a
// broken secured server shows as a stopped ferretdb.
//
// Usage: ferretdb-server -listen 127.0.0.1:27017 -dir /path/to/data/dir
//
//	[-tls-listen 127.0.0.1:27018 -tls-cert F -tls-key F]
//	[-secure-bin PATH -secure-listen 127.0.0.1:27019 -secure-dir DIR -secure-database DB
//	 -secure-user NAME] (needs -tls-cert and -tls-key too)
package main

import (
	"context"
	"flag"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on")
	dir := flag.String("dir", "", "existing directory for the SQLite databases (required)")
	secureBin := flag.String("secure-bin", "", "FerretDB's cmd/ferretdb binary for the secured server (optional)")
	tlsListen := flag.String("tls-listen", "", "TLS address of this process's second listener (optional)")
	secureListen := flag.String("secure-listen", "127.0.0.1:27019", "TLS address of the secured server")
	secureDir := flag.String("secure-dir", "", "data directory of the secured server")
	tlsCert := flag.String("tls-cert", "", "PEM certificate (chain) of the TLS listeners")
	tlsKey := flag.String("tls-key", "", "PEM key of the TLS listeners")
	secureDatabase := flag.String("secure-database", "photon_test", "database the secured server's user is made in")
	secureUser := flag.String("secure-user", "photon", "user made at the secured server's first start")
	flag.Parse()

	abs := absDir(*dir, "-dir")
	if (*tlsListen != "" || *secureBin != "") && (*tlsCert == "" || *tlsKey == "") {
		log.Fatal("-tls-listen and -secure-bin need -tls-cert and -tls-key")
	}

	listener := ferretdb.ListenerConfig{TCP: *listen}
	if *tlsListen != "" {
		// No TLSCAFile: FerretDB would then demand a client certificate signed by it.
		listener.TLS, listener.TLSCertFile, listener.TLSKeyFile = *tlsListen, *tlsCert, *tlsKey
	}
	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  listener,
		Handler:   "sqlite",
		SQLiteURL: "file:" + abs + "/",
	})
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	var child *exec.Cmd
	childDone := make(chan error, 1)
	if *secureBin != "" {
		if os.Getenv("FERRETDB_SETUP_PASSWORD") == "" {
			log.Fatal("-secure-bin needs the user's password in $FERRETDB_SETUP_PASSWORD")
		}
		sdir := absDir(*secureDir, "-secure-dir")
		child = exec.Command(*secureBin,
			"--handler=sqlite",
			"--sqlite-url=file:"+sdir+"/",
			"--state-dir="+sdir,
			"--listen-addr=", // no plain TCP listener: TLS only
			"--listen-tls="+*secureListen,
			"--listen-tls-cert-file="+*tlsCert,
			"--listen-tls-key-file="+*tlsKey,
			"--test-enable-new-auth",
			"--setup-database="+*secureDatabase,
			"--setup-username="+*secureUser,
			"--debug-addr=-",
			"--telemetry=disable",
			"--log-level=INFO",
		)
		child.Stdout = os.Stdout
		child.Stderr = os.Stderr
		child.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := child.Start(); err != nil {
			log.Fatalf("ferretdb-server: starting the secured server: %v", err)
		}
		log.Printf("ferretdb-server: secured server (TLS, SCRAM) pid %d on %s, data in %s",
			child.Process.Pid, *secureListen, sdir)
		go func() { childDone <- child.Wait() }()
	}

	runDone := make(chan struct{})
	go func() {
		log.Printf("ferretdb-server: listening on %s (TLS: %q), data in %s", *listen, *tlsListen, abs)
		f.Run(ctx)
		close(runDone)
	}()

	select {
	case <-runDone:
	case err := <-childDone:
		// A stop signals the whole process group: the child may see it first.
		select {
		case <-ctx.Done():
			<-runDone
			log.Print("ferretdb-server: stopped")
			return
		case <-time.After(time.Second):
		}
		// The secured server is gone on its own: stop the open one too, so that the failure shows.
		log.Printf("ferretdb-server: the secured server exited (%v); stopping", err)
		stop()
		<-runDone
		os.Exit(1)
	}

	if child != nil {
		_ = child.Process.Signal(syscall.SIGTERM)
		select {
		case <-childDone:
		case <-time.After(20 * time.Second):
			_ = child.Process.Kill()
			<-childDone
		}
	}
	log.Print("ferretdb-server: stopped")
}

// absDir makes dir (a required flag's value) absolute and creates it.
func absDir(dir, name string) string {
	if dir == "" {
		log.Fatalf("%s is required", name)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		log.Fatal(err)
	}
	return abs
}
