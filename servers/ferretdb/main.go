// Command ferretdb-server runs FerretDB (a MongoDB wire-protocol server) for the project's tests,
// over PostgreSQL (-postgresql URL) or SQLite (-dir). It embeds the public
// github.com/FerretDB/FerretDB/ferretdb package, because `go install .../cmd/ferretdb` builds a
// binary that panics at start (missing version.txt).
//
// Usage:
//
//	ferretdb-server -listen 127.0.0.1:27017 -postgresql postgres://user@127.0.0.1:55432/ferretdb
//	ferretdb-server -listen 127.0.0.1:27017 -dir /path/to/data/dir   (SQLite)
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
	pgURL := flag.String("postgresql", "", "PostgreSQL URL: use the PostgreSQL backend")
	dir := flag.String("dir", "", "directory for the SQLite databases: use the SQLite backend")
	flag.Parse()

	config := ferretdb.Config{Listener: ferretdb.ListenerConfig{TCP: *listen}}
	var where string
	switch {
	case *pgURL != "" && *dir != "":
		log.Fatal("give one of -postgresql and -dir, not both")
	case *pgURL != "":
		config.Handler = "postgresql"
		config.PostgreSQLURL = *pgURL
		where = "PostgreSQL " + *pgURL
	case *dir != "":
		abs, err := filepath.Abs(*dir)
		if err != nil {
			log.Fatal(err)
		}
		if err := os.MkdirAll(abs, 0o755); err != nil {
			log.Fatal(err)
		}
		config.Handler = "sqlite"
		config.SQLiteURL = "file:" + abs + "/"
		where = "SQLite in " + abs
	default:
		log.Fatal("one of -postgresql and -dir is required")
	}

	f, err := ferretdb.New(&config)
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	log.Printf("ferretdb-server: listening on %s, data in %s", *listen, where)
	f.Run(ctx)
	log.Print("ferretdb-server: stopped")
}
