// Command ferretdb-server runs FerretDB (a MongoDB wire-protocol server) with its SQLite backend
// for the project's tests. It embeds the public github.com/FerretDB/FerretDB/ferretdb package,
// because `go install .../cmd/ferretdb` builds a binary that panics at start (missing version.txt).
//
// Usage: ferretdb-server -listen 127.0.0.1:27017 -dir /path/to/existing/data/dir
package main

import (
	"context"
	"flag"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on")
	dir := flag.String("dir", "", "existing directory for the SQLite databases (required)")
	flag.Parse()

	if *dir == "" {
		log.Fatal("-dir is required")
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		log.Fatal(err)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: "file:" + abs + "/",
	})
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	log.Printf("ferretdb-server: listening on %s, data in %s", *listen, abs)
	f.Run(ctx)
	log.Print("ferretdb-server: stopped")
}
