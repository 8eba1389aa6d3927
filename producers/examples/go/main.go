// Command producer sends N operation.requested events to aipipe, the way an upstream
// service in Go would: each event is built from the contract, checked against the JSON
// Schema that `aipipe schemas export` writes, and sent keyed by client_id with the
// request_id and event_type headers, by an idempotent producer with acks=all.
//
// It prints one JSON line per acknowledged event (event_id, request_id, partition,
// offset). Exit codes: 0 sent, 1 Kafka did not acknowledge, 2 the event is invalid
// (nothing is sent), 64 bad command line.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/dlclark/regexp2/v2"
	"github.com/google/uuid"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
	"github.com/twmb/franz-go/pkg/kgo"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
)

const (
	eventType  = "operation.requested"
	schemaFile = eventType + ".schema.json"
	// The pipeline refuses larger messages (a rule outside the schema, see the README).
	maxMessageBytes = 1_000_000
	// RFC 3339 in UTC with microseconds, as the schema's pattern allows.
	rfc3339Micros = "2006-01-02T15:04:05.000000Z07:00"
)

type options struct {
	clientID, model, topic, bootstrap, schemas  string
	operationType, provider, params, occurredAt string
	count                                       int
}

// invalidEvent is an event the schema refuses, or a command line that cannot make one.
type invalidEvent struct{ msg string }

func (e *invalidEvent) Error() string { return e.msg }

func parseOptions(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("producer", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	fs.StringVar(&o.clientID, "client-id", "", "the client the operations are billed to (the record key)")
	fs.StringVar(&o.model, "model", "", "model, e.g. gemini-2.5-flash-image")
	fs.IntVar(&o.count, "count", 1, "how many events to send")
	fs.StringVar(&o.topic, "topic", "", "the requested topic, <prefix>.operations.requested")
	fs.StringVar(&o.bootstrap, "bootstrap", "127.0.0.1:9092", "Kafka bootstrap host:port")
	fs.StringVar(&o.schemas, "schemas", "", "the folder `aipipe schemas export DIR` wrote")
	fs.StringVar(&o.operationType, "operation-type", "image_generation", "image_generation, video_generation or text_generation")
	fs.StringVar(&o.provider, "provider", "simulated", "provider name")
	fs.StringVar(&o.params, "params", `{"prompt": "a red chair on a white floor"}`, "params as a JSON object")
	fs.StringVar(&o.occurredAt, "occurred-at", "", "RFC 3339 time in UTC (default: now)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	for name, value := range map[string]string{"client-id": o.clientID, "model": o.model, "topic": o.topic, "schemas": o.schemas} {
		if value == "" && !isSet(fs, name) {
			return o, fmt.Errorf("-%s is required", name)
		}
	}
	if o.count < 1 {
		return o, errors.New("-count must be at least 1")
	}
	return o, nil
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func main() {
	o, err := parseOptions(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(64)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		var invalid *invalidEvent
		if errors.As(err, &invalid) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func run(o options) error {
	schema, err := loadSchema(filepath.Join(o.schemas, schemaFile))
	if err != nil {
		return err
	}
	var params any
	decoder := json.NewDecoder(strings.NewReader(o.params))
	decoder.UseNumber() // 2 stays 2, never 2.0
	if err := decoder.Decode(&params); err != nil {
		return &invalidEvent{fmt.Sprintf("field 'params': -params is not JSON (%v)", err)}
	}
	records := make([]*kgo.Record, 0, o.count)
	for range o.count {
		event := newEvent(o, params)
		value, err := json.Marshal(event)
		if err != nil {
			return err
		}
		if err := validate(schema, value); err != nil {
			return err
		}
		records = append(records, &kgo.Record{
			Topic: o.topic,
			Key:   []byte(o.clientID),
			Value: value,
			Headers: []kgo.RecordHeader{
				{Key: "request_id", Value: []byte(event["request_id"].(string))},
				{Key: "event_type", Value: []byte(eventType)},
			},
		})
	}
	return send(o, records)
}

func loadSchema(path string) (*jsonschema.Schema, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, &invalidEvent{fmt.Sprintf("%s cannot be read (%v): write it with `aipipe schemas export %s`", path, err, filepath.Dir(path))}
	}
	defer file.Close()
	doc, err := jsonschema.UnmarshalJSON(file)
	if err != nil {
		return nil, fmt.Errorf("%s is not JSON: %w", path, err)
	}
	compiler := jsonschema.NewCompiler()
	compiler.DefaultDraft(jsonschema.Draft2020)
	// format: date-time is asserted, as the README asks of a validator (the pattern alone
	// lets February 30 through).
	compiler.AssertFormat()
	// The schema's patterns are ECMA-262 and one has a lookahead, which Go's RE2 lacks.
	compiler.UseRegexpEngine(ecmaRegexp)
	if err := compiler.AddResource(path, doc); err != nil {
		return nil, err
	}
	return compiler.Compile(path)
}

type ecmaPattern struct{ re *regexp2.Regexp }

func (p ecmaPattern) MatchString(s string) bool {
	ok, err := p.re.MatchString(s)
	return err == nil && ok
}

func (p ecmaPattern) String() string { return p.re.String() }

func ecmaRegexp(pattern string) (jsonschema.Regexp, error) {
	re, err := regexp2.Compile(pattern, regexp2.ECMAScript)
	if err != nil {
		return nil, err
	}
	return ecmaPattern{re}, nil
}

// newEvent builds one event with a fresh event_id, kept for every retry of this event by
// the idempotent producer.
func newEvent(o options, params any) map[string]any {
	occurredAt := o.occurredAt
	if occurredAt == "" {
		occurredAt = time.Now().UTC().Format(rfc3339Micros)
	}
	return map[string]any{
		"event_id":       uuid.NewString(),
		"event_type":     eventType,
		"schema_version": 1,
		"occurred_at":    occurredAt,
		"request_id":     "go-" + uuid.NewString(),
		"client_id":      o.clientID,
		"operation_type": o.operationType,
		"provider":       o.provider,
		"model":          o.model,
		"params":         params,
	}
}

// validate checks the bytes that will be sent, decoded the way the validator reads JSON.
func validate(schema *jsonschema.Schema, value []byte) error {
	instance, err := jsonschema.UnmarshalJSON(bytes.NewReader(value))
	if err != nil {
		return err
	}
	if err := schema.Validate(instance); err != nil {
		var verr *jsonschema.ValidationError
		if !errors.As(err, &verr) {
			return err
		}
		printer := message.NewPrinter(language.English)
		var lines []string
		for _, leaf := range leaves(verr) {
			lines = append(lines, fmt.Sprintf("field '%s': %s", fieldOf(leaf), leaf.ErrorKind.LocalizedString(printer)))
		}
		return &invalidEvent{fmt.Sprintf("the %s event does not match %s, nothing was sent: %s", eventType, schemaFile, strings.Join(lines, "; "))}
	}
	if len(value) > maxMessageBytes {
		return &invalidEvent{fmt.Sprintf("the event is %d bytes, over the pipeline's limit of %d; send smaller params", len(value), maxMessageBytes)}
	}
	return nil
}

func leaves(e *jsonschema.ValidationError) []*jsonschema.ValidationError {
	if len(e.Causes) == 0 {
		return []*jsonschema.ValidationError{e}
	}
	var out []*jsonschema.ValidationError
	for _, cause := range e.Causes {
		out = append(out, leaves(cause)...)
	}
	return out
}

// fieldOf names the top-level field an error is about: its location, or the properties it names.
func fieldOf(e *jsonschema.ValidationError) string {
	if len(e.InstanceLocation) > 0 {
		return e.InstanceLocation[0]
	}
	switch k := e.ErrorKind.(type) {
	case *kind.Required:
		return strings.Join(k.Missing, ", ")
	case *kind.AdditionalProperties:
		return strings.Join(k.Properties, ", ")
	}
	return "(event)"
}

func send(o options, records []*kgo.Record) error {
	// franz-go's producer is idempotent unless told otherwise; acks=all is required for it.
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(o.bootstrap, ",")...),
		kgo.ClientID("aipipe-go-example"),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerLinger(5*time.Millisecond),
		kgo.ProducerBatchCompression(kgo.Lz4Compression()),
		kgo.RecordDeliveryTimeout(60*time.Second),
	)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	results := client.ProduceSync(ctx, records...)
	if err := results.FirstErr(); err != nil {
		return fmt.Errorf("Kafka did not acknowledge an event: %w", err)
	}
	out := json.NewEncoder(os.Stdout)
	for _, result := range results {
		var event struct {
			EventID   string `json:"event_id"`
			RequestID string `json:"request_id"`
		}
		if err := json.Unmarshal(result.Record.Value, &event); err != nil {
			return err
		}
		if err := out.Encode(map[string]any{
			"event_id": event.EventID, "request_id": event.RequestID,
			"partition": result.Record.Partition, "offset": result.Record.Offset,
		}); err != nil {
			return err
		}
	}
	return nil
}
