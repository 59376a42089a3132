// The secured Cassandra node (servers/cassandra/cassandra-secure.yaml): TLS on every client
// connection, password authentication, GRANT-based authorization.
//
//	probe cassandra-secure 127.0.0.1:9142
//
// logs in over TLS as the default superuser (cassandra/cassandra, test-only), creates what the
// tests of photon-cassandra/tests/secured.rs need if it is missing, then logs in as the writer
// and answers SELECT release_version FROM system.local. Every statement is idempotent (IF NOT
// EXISTS, REVOKE of what a role must not hold, GRANT; a password is reset only when the role
// cannot log in with it), so scripts/servers may call it on every poll and after a restart. The names
// and passwords come from the environment (scripts/servers sets them):
//
//	CASSANDRA_TLS_CA                      PEM file of the CA that signed the node's certificate
//	CASSANDRA_KEYSPACE                    the tests' keyspace: the writer may do anything in it,
//	                                      the reader only SELECT
//	CASSANDRA_OTHER_KEYSPACE              a keyspace no test role has any right on
//	CASSANDRA_WRITER, _WRITER_PASSWORD    CREATE, SELECT, MODIFY on CASSANDRA_KEYSPACE only
//	CASSANDRA_READER, _READER_PASSWORD    SELECT on CASSANDRA_KEYSPACE only
//	CASSANDRA_OUTSIDER, _OUTSIDER_PASSWORD  a login with no permission at all
package main

import (
	"fmt"
	"os"
	"regexp"
	"strings"

	"github.com/gocql/gocql"
)

// The superuser Cassandra creates on a fresh node with PasswordAuthenticator.
const (
	superuser         = "cassandra"
	superuserPassword = "cassandra"
)

// Keyspace and role names go into CQL text: only plain identifiers are accepted.
var identifier = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

type secureSetup struct {
	ca                         string
	keyspace, otherKeyspace    string
	writer, writerPassword     string
	reader, readerPassword     string
	outsider, outsiderPassword string
}

func cassandraSecure(addr string) (string, error) {
	s, err := secureSetupFromEnv()
	if err != nil {
		return "", err
	}
	admin, err := secureSession(addr, s.ca, superuser, superuserPassword)
	if err != nil {
		return "", fmt.Errorf("superuser login over TLS: %w", err)
	}
	defer admin.Close()

	replication := "{'class': 'SimpleStrategy', 'replication_factor': 1}"
	stmts := []string{
		"CREATE KEYSPACE IF NOT EXISTS " + s.keyspace + " WITH replication = " + replication,
		"CREATE KEYSPACE IF NOT EXISTS " + s.otherKeyspace + " WITH replication = " + replication,
	}
	for _, r := range [][2]string{{s.writer, s.writerPassword}, {s.reader, s.readerPassword}, {s.outsider, s.outsiderPassword}} {
		stmts = append(stmts,
			fmt.Sprintf("CREATE ROLE IF NOT EXISTS %s WITH PASSWORD = '%s' AND LOGIN = true", r[0], r[1]),
		)
	}
	// Broader grants of an earlier run go, so the roles hold exactly the ones below. Only the
	// permissions a role must not hold are revoked, one by one: `status` runs this probe while
	// tests may be running, and a REVOKE ALL before the GRANTs would refuse them meanwhile.
	keep := map[string]map[string]bool{
		s.writer + " " + s.keyspace: {"CREATE": true, "SELECT": true, "MODIFY": true},
		s.reader + " " + s.keyspace: {"SELECT": true},
	}
	for _, role := range []string{s.writer, s.reader, s.outsider} {
		for _, ks := range []string{s.keyspace, s.otherKeyspace} {
			for _, p := range []string{"CREATE", "ALTER", "DROP", "SELECT", "MODIFY", "AUTHORIZE", "UNMASK", "SELECT_MASKED"} {
				if !keep[role+" "+ks][p] {
					stmts = append(stmts, "REVOKE "+p+" ON KEYSPACE "+ks+" FROM "+role)
				}
			}
		}
	}
	stmts = append(stmts, "REVOKE ALL PERMISSIONS ON TABLE system_views.settings FROM "+s.outsider)
	// Exactly the grants photon-cassandra/README.md documents, so the tests prove they are
	// enough: the writer creates the tables (CREATE), reads (SELECT) and writes (MODIFY); both
	// read the node's commit log settings (system_views.settings) for health and require_durable.
	stmts = append(stmts,
		"GRANT CREATE ON KEYSPACE "+s.keyspace+" TO "+s.writer,
		"GRANT SELECT ON KEYSPACE "+s.keyspace+" TO "+s.writer,
		"GRANT MODIFY ON KEYSPACE "+s.keyspace+" TO "+s.writer,
		"GRANT SELECT ON system_views.settings TO "+s.writer,
		"GRANT SELECT ON KEYSPACE "+s.keyspace+" TO "+s.reader,
		"GRANT SELECT ON system_views.settings TO "+s.reader,
	)
	for _, q := range stmts {
		if err := admin.Query(q).Exec(); err != nil {
			return "", fmt.Errorf("setup: %s: %w", redactPasswords(q), err)
		}
	}
	// A role left by an earlier run with another password keeps it otherwise. Only then: the
	// node allows one password change per role every few seconds, and status probes often.
	for _, r := range [][2]string{{s.writer, s.writerPassword}, {s.reader, s.readerPassword}, {s.outsider, s.outsiderPassword}} {
		if login, err := secureSession(addr, s.ca, r[0], r[1]); err == nil {
			login.Close()
			continue
		}
		q := fmt.Sprintf("ALTER ROLE %s WITH PASSWORD = '%s' AND LOGIN = true", r[0], r[1])
		if err := admin.Query(q).Exec(); err != nil {
			return "", fmt.Errorf("setup: %s: %w", redactPasswords(q), err)
		}
	}

	writer, err := secureSession(addr, s.ca, s.writer, s.writerPassword)
	if err != nil {
		return "", fmt.Errorf("login as %s over TLS: %w", s.writer, err)
	}
	defer writer.Close()
	var version string
	if err := writer.Query("SELECT release_version FROM system.local").Scan(&version); err != nil {
		return "", err
	}
	return fmt.Sprintf("cassandra-secure: TLS, roles %s/%s/%s on %s, release_version %s",
		s.writer, s.reader, s.outsider, s.keyspace, version), nil
}

func secureSetupFromEnv() (secureSetup, error) {
	get := func(name string) string { return os.Getenv("CASSANDRA_" + name) }
	s := secureSetup{
		ca: get("TLS_CA"), keyspace: get("KEYSPACE"), otherKeyspace: get("OTHER_KEYSPACE"),
		writer: get("WRITER"), writerPassword: get("WRITER_PASSWORD"),
		reader: get("READER"), readerPassword: get("READER_PASSWORD"),
		outsider: get("OUTSIDER"), outsiderPassword: get("OUTSIDER_PASSWORD"),
	}
	for _, id := range []string{s.keyspace, s.otherKeyspace, s.writer, s.reader, s.outsider} {
		if !identifier.MatchString(id) {
			return s, fmt.Errorf("CASSANDRA_* names must be plain CQL identifiers, got %q", id)
		}
	}
	for _, pw := range []string{s.writerPassword, s.readerPassword, s.outsiderPassword} {
		if pw == "" || strings.Contains(pw, "'") {
			return s, fmt.Errorf("CASSANDRA_*_PASSWORD must be set and hold no quote")
		}
	}
	if s.ca == "" {
		return s, fmt.Errorf("CASSANDRA_TLS_CA is not set")
	}
	return s, nil
}

// secureSession logs in as user over TLS, trusting only the CA in caFile and checking that the
// certificate names the host.
func secureSession(addr, caFile, user, password string) (*gocql.Session, error) {
	cluster := gocql.NewCluster(addr)
	cluster.Timeout = timeout
	cluster.ConnectTimeout = timeout
	cluster.NumConns = 1
	cluster.Authenticator = gocql.PasswordAuthenticator{Username: user, Password: password}
	cluster.SslOpts = &gocql.SslOptions{CaPath: caFile, EnableHostVerification: true}
	return cluster.CreateSession()
}

var passwordClause = regexp.MustCompile(`PASSWORD = '[^']*'`)

func redactPasswords(q string) string { return passwordClause.ReplaceAllString(q, "PASSWORD = '***'") }
