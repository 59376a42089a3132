// Command probe asks one of the test servers a real request and exits 0 when it answers.
// scripts/servers calls it in a loop until each server is ready.
//
//	probe kafka 127.0.0.1:9092        metadata request; needs at least one broker and a controller
//	probe cassandra 127.0.0.1:9042    SELECT release_version FROM system.local
//	probe mongo mongodb://127.0.0.1:27017/?directConnection=true   ping command
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/gocql/gocql"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"go.mongodb.org/mongo-driver/bson"
	"go.mongodb.org/mongo-driver/mongo"
	"go.mongodb.org/mongo-driver/mongo/options"
)

const timeout = 5 * time.Second

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: probe kafka|cassandra|mongo ADDRESS")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	var (
		info string
		err  error
	)
	switch os.Args[1] {
	case "kafka":
		info, err = kafka(ctx, os.Args[2])
	case "cassandra":
		info, err = cassandra(os.Args[2])
	case "cassandra-secure":
		info, err = cassandraSecure(os.Args[2])
	case "kafka-secure":
		info, err = kafkaSecure(ctx, os.Args[2])
	case "mongo":
		info, err = mongoPing(ctx, os.Args[2])
	default:
		err = fmt.Errorf("unknown server %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "probe %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	fmt.Println(info)
}

func kafka(ctx context.Context, addr string) (string, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.RequestRetries(0))
	if err != nil {
		return "", err
	}
	defer cl.Close()

	req := kmsg.NewPtrMetadataRequest() // nil topics = all topics
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return "", err
	}
	if len(resp.Brokers) == 0 || resp.ControllerID < 0 {
		return "", errors.New("no broker or controller in metadata yet")
	}
	// The advertised addresses show which listener answered (FAULTS advertises the proxy's port).
	addrs := make([]string, 0, len(resp.Brokers))
	for _, b := range resp.Brokers {
		addrs = append(addrs, fmt.Sprintf("%d@%s:%d", b.NodeID, b.Host, b.Port))
	}
	return fmt.Sprintf("kafka: cluster %s, broker(s) %s, controller %d",
		deref(resp.ClusterID), strings.Join(addrs, ","), resp.ControllerID), nil
}

func cassandra(addr string) (string, error) {
	cluster := gocql.NewCluster(addr)
	cluster.Timeout = timeout
	cluster.ConnectTimeout = timeout
	cluster.NumConns = 1
	session, err := cluster.CreateSession()
	if err != nil {
		return "", err
	}
	defer session.Close()

	var version string
	if err := session.Query("SELECT release_version FROM system.local").Scan(&version); err != nil {
		return "", err
	}
	return "cassandra: release_version " + version, nil
}

func mongoPing(ctx context.Context, uri string) (string, error) {
	client, err := mongo.Connect(ctx, options.Client().ApplyURI(uri).
		SetServerSelectionTimeout(timeout).SetConnectTimeout(timeout))
	if err != nil {
		return "", err
	}
	defer func() { _ = client.Disconnect(context.Background()) }()

	var res bson.M
	if err := client.Database("admin").RunCommand(ctx, bson.D{{Key: "ping", Value: 1}}).Decode(&res); err != nil {
		return "", err
	}
	var build bson.M
	if err := client.Database("admin").RunCommand(ctx, bson.D{{Key: "buildInfo", Value: 1}}).Decode(&build); err != nil {
		return "", err
	}
	return fmt.Sprintf("mongo: ping ok, version %v", build["version"]), nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
