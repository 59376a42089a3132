// probe kafka-secure: the secured Kafka listener (SASL_SSL, SCRAM-SHA-512, ACLs) of issue 19.
//
// Through the open listener (KAFKA_ADMIN_ADDR, whose clients are User:ANONYMOUS, a super user) it
// makes the two test users and their ACLs, every time: an upsert of a SCRAM credential and the
// creation of an ACL that exists are no-ops in effect, and the broker keeps both in its metadata
// log, so a machine whose storage was formatted before this listener existed gets them too. Then
// it logs in on ADDRESS over TLS (trusting KAFKA_TLS_CA) as the writer and asks for metadata, so
// the caller knows the secured listener answers an authenticated request.
//
// What the users may do is exactly what photon-kafka needs (photon-kafka/README.md, "Production:
// TLS and credentials"): with KAFKA_PREFIX=p, topics are p.<category> and transactional ids
// photon.p.<category>.<partition>. Its consumers carry group.id photon-reader but never join the
// group nor commit offsets, so no group ACL is needed (photon-kafka/tests/secured.rs runs
// without one).
package main

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// scramSHA512 is the mechanism's number in AlterUserSCRAMCredentials.
const scramSHA512 = 2

// scramIterations is the broker's minimum, enough for a test password.
const scramIterations = 4096

func kafkaSecure(ctx context.Context, addr string) (string, error) {
	env := func(name string) string { return os.Getenv(name) }
	admin, prefix := env("KAFKA_ADMIN_ADDR"), env("KAFKA_PREFIX")
	writer, writerPw := env("KAFKA_WRITER"), env("KAFKA_WRITER_PASSWORD")
	reader, readerPw := env("KAFKA_READER"), env("KAFKA_READER_PASSWORD")
	if admin == "" || prefix == "" || writer == "" || writerPw == "" || reader == "" || readerPw == "" {
		return "", errors.New("set KAFKA_ADMIN_ADDR, KAFKA_PREFIX, KAFKA_WRITER(_PASSWORD), KAFKA_READER(_PASSWORD), KAFKA_TLS_CA")
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(admin), kgo.RequestRetries(0))
	if err != nil {
		return "", err
	}
	defer cl.Close()
	if err := upsertUsers(ctx, cl, map[string]string{writer: writerPw, reader: readerPw}); err != nil {
		return "", fmt.Errorf("creating SCRAM users: %w", err)
	}
	if err := createACLs(ctx, cl, aclsFor(prefix, writer, reader)); err != nil {
		return "", fmt.Errorf("creating ACLs: %w", err)
	}
	brokers, err := secureMetadata(ctx, addr, writer, writerPw)
	if err != nil {
		return "", fmt.Errorf("SASL_SSL login as %s on %s: %w", writer, addr, err)
	}
	return fmt.Sprintf("kafka-secure: %s logged in over TLS, %d broker(s)", writer, brokers), nil
}

func upsertUsers(ctx context.Context, cl *kgo.Client, users map[string]string) error {
	req := kmsg.NewPtrAlterUserSCRAMCredentialsRequest()
	for name, password := range users {
		salt := make([]byte, 32)
		if _, err := rand.Read(salt); err != nil {
			return err
		}
		salted, err := pbkdf2.Key(sha512.New, password, salt, scramIterations, sha512.Size)
		if err != nil {
			return err
		}
		u := kmsg.NewAlterUserSCRAMCredentialsRequestUpsertion()
		u.Name, u.Mechanism, u.Iterations = name, scramSHA512, scramIterations
		u.Salt, u.SaltedPassword = salt, salted
		req.Upsertions = append(req.Upsertions, u)
	}
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return err
	}
	for _, r := range resp.Results {
		if err := kerrOf(r.ErrorCode, r.ErrorMessage); err != nil {
			return fmt.Errorf("user %s: %w", r.User, err)
		}
	}
	return nil
}

type acl struct {
	resource kmsg.ACLResourceType
	name     string
	pattern  kmsg.ACLResourcePatternType
	user     string
	op       kmsg.ACLOperation
}

// aclsFor is what each user may do. The writer: create, write, read and describe (configs too:
// a topic's first use checks its retention) the topics under the prefix, use the transactional
// ids of their partitions, and read the brokers' default.replication.factor (DescribeConfigs on
// the cluster, for topics created with replication_factor=-1). The reader: read and describe
// the topics, nothing else.
func aclsFor(prefix, writer, reader string) []acl {
	const (
		topic   = kmsg.ACLResourceTypeTopic
		txn     = kmsg.ACLResourceTypeTransactionalId
		cluster = kmsg.ACLResourceTypeCluster
		pre     = kmsg.ACLResourcePatternTypePrefixed
		lit     = kmsg.ACLResourcePatternTypeLiteral
	)
	topics, txns := prefix+".", "photon."+prefix+"."
	var out []acl
	for _, op := range []kmsg.ACLOperation{kmsg.ACLOperationCreate, kmsg.ACLOperationWrite,
		kmsg.ACLOperationRead, kmsg.ACLOperationDescribe, kmsg.ACLOperationDescribeConfigs} {
		out = append(out, acl{topic, topics, pre, writer, op})
	}
	out = append(out,
		acl{txn, txns, pre, writer, kmsg.ACLOperationWrite},
		acl{txn, txns, pre, writer, kmsg.ACLOperationDescribe},
		acl{cluster, "kafka-cluster", lit, writer, kmsg.ACLOperationDescribeConfigs},
	)
	for _, op := range []kmsg.ACLOperation{kmsg.ACLOperationRead, kmsg.ACLOperationDescribe,
		kmsg.ACLOperationDescribeConfigs} {
		out = append(out, acl{topic, topics, pre, reader, op})
	}
	return out
}

func createACLs(ctx context.Context, cl *kgo.Client, acls []acl) error {
	req := kmsg.NewPtrCreateACLsRequest()
	for _, a := range acls {
		c := kmsg.NewCreateACLsRequestCreation()
		c.ResourceType, c.ResourceName, c.ResourcePatternType = a.resource, a.name, a.pattern
		c.Principal, c.Host = "User:"+a.user, "*"
		c.Operation, c.PermissionType = a.op, kmsg.ACLPermissionTypeAllow
		req.Creations = append(req.Creations, c)
	}
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return err
	}
	for i, r := range resp.Results {
		if err := kerrOf(r.ErrorCode, r.ErrorMessage); err != nil {
			return fmt.Errorf("ACL %d: %w", i, err)
		}
	}
	return nil
}

// secureMetadata logs in on addr with SCRAM-SHA-512 over TLS and returns the brokers' count.
func secureMetadata(ctx context.Context, addr, user, password string) (int, error) {
	pem, err := os.ReadFile(os.Getenv("KAFKA_TLS_CA"))
	if err != nil {
		return 0, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return 0, errors.New("KAFKA_TLS_CA holds no PEM certificate")
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.RequestRetries(0),
		kgo.DialTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}),
		kgo.SASL(scram.Auth{User: user, Pass: password}.AsSha512Mechanism()))
	if err != nil {
		return 0, err
	}
	defer cl.Close()
	resp, err := kmsg.NewPtrMetadataRequest().RequestWith(ctx, cl)
	if err != nil {
		return 0, err
	}
	if len(resp.Brokers) == 0 {
		return 0, errors.New("no broker in the metadata")
	}
	return len(resp.Brokers), nil
}

func kerrOf(code int16, message *string) error {
	if code == 0 {
		return nil
	}
	if message != nil {
		return fmt.Errorf("error code %d: %s", code, *message)
	}
	return fmt.Errorf("error code %d", code)
}
