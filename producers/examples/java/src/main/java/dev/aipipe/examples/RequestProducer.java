package dev.aipipe.examples;

import com.networknt.schema.Error;
import com.networknt.schema.Schema;
import com.networknt.schema.SchemaRegistry;
import com.networknt.schema.SchemaRegistryConfig;
import com.networknt.schema.SpecificationVersion;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Future;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;
import tools.jackson.core.JacksonException;
import tools.jackson.databind.JsonNode;
import tools.jackson.databind.json.JsonMapper;
import tools.jackson.databind.node.ObjectNode;

/**
 * Produces N {@code operation.requested} events to aipipe, the way an upstream service in
 * Java would: each event is built from the contract, checked against the JSON Schema that
 * {@code aipipe schemas export} writes, and sent keyed by {@code client_id} with the
 * {@code request_id} and {@code event_type} headers, by an idempotent producer with
 * {@code acks=all}.
 *
 * <p>Prints one JSON line per acknowledged event ({@code event_id}, {@code request_id},
 * {@code partition}, {@code offset}). Exit codes: 0 sent, 1 Kafka did not acknowledge,
 * 2 the event is invalid (nothing is sent), 64 bad command line.
 */
public final class RequestProducer {
    static final String EVENT_TYPE = "operation.requested";
    static final String SCHEMA_FILE = EVENT_TYPE + ".schema.json";
    /** The pipeline refuses larger messages (a rule outside the schema, see the README). */
    static final int MAX_MESSAGE_BYTES = 1_000_000;
    private static final DateTimeFormatter RFC3339_UTC =
            DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss.SSSSSS'Z'").withZone(ZoneOffset.UTC);
    private static final JsonMapper JSON = JsonMapper.builder().build();

    private RequestProducer() {}

    /** An event the schema refuses, or a command line that cannot make one. */
    static final class InvalidEvent extends Exception {
        InvalidEvent(String message) {
            super(message);
        }
    }

    record Options(
            String clientId, String model, int count, String topic, String bootstrap,
            Path schemaDir, String operationType, String provider, String params,
            String occurredAt) {

        static Options parse(String[] args) throws InvalidEvent {
            Map<String, String> values = new HashMap<>();
            for (int i = 0; i < args.length; i += 2) {
                if (!args[i].startsWith("--") || i + 1 >= args.length) {
                    throw new InvalidEvent("expected --name value pairs, got '" + args[i] + "'");
                }
                values.put(args[i].substring(2), args[i + 1]);
            }
            for (String required : List.of("client-id", "model", "count", "topic", "schemas")) {
                if (!values.containsKey(required)) {
                    throw new InvalidEvent("--" + required + " is required");
                }
            }
            int count;
            try {
                count = Integer.parseInt(values.get("count"));
            } catch (NumberFormatException e) {
                throw new InvalidEvent("--count must be a whole number, got '" + values.get("count") + "'");
            }
            if (count < 1) {
                throw new InvalidEvent("--count must be at least 1");
            }
            return new Options(
                    values.get("client-id"), values.get("model"), count, values.get("topic"),
                    values.getOrDefault("bootstrap", "127.0.0.1:9092"),
                    Path.of(values.get("schemas")),
                    values.getOrDefault("operation-type", "image_generation"),
                    values.getOrDefault("provider", "simulated"),
                    values.getOrDefault("params", "{\"prompt\": \"a red chair on a white floor\"}"),
                    values.get("occurred-at"));
        }
    }

    static final String USAGE = String.join("\n",
            "usage: java -jar aipipe-producer.jar --client-id ID --model MODEL --count N",
            "         --topic TOPIC --schemas DIR [--bootstrap HOST:PORT]",
            "         [--operation-type image_generation|video_generation|text_generation]",
            "         [--provider NAME] [--params JSON] [--occurred-at RFC3339-UTC (default: now)]",
            "DIR holds the files `aipipe schemas export DIR` writes.");

    public static void main(String[] args) {
        Options options;
        try {
            options = Options.parse(args);
        } catch (InvalidEvent e) {
            System.err.println("error: " + e.getMessage() + "\n" + USAGE);
            System.exit(64);
            return;
        }
        try {
            Schema schema = loadSchema(options.schemaDir().resolve(SCHEMA_FILE));
            JsonNode params = parseParams(options.params());
            List<ObjectNode> events = new ArrayList<>();
            for (int i = 0; i < options.count(); i++) {
                ObjectNode event = newEvent(options, params);
                validate(schema, event);
                events.add(event);
            }
            send(options, events);
        } catch (InvalidEvent e) {
            System.err.println("error: " + e.getMessage());
            System.exit(2);
        } catch (ExecutionException e) {
            System.err.println("error: Kafka did not acknowledge an event: " + e.getCause());
            System.exit(1);
        } catch (IOException | InterruptedException e) {
            System.err.println("error: " + e);
            System.exit(1);
        }
    }

    static Schema loadSchema(Path file) throws InvalidEvent, IOException {
        if (!Files.isRegularFile(file)) {
            throw new InvalidEvent(file + " does not exist: write it with `aipipe schemas export "
                    + file.getParent() + "`");
        }
        // format: date-time is asserted, as the README asks of a validator (the pattern alone
        // lets February 30 through); patterns run on java.util.regex.
        SchemaRegistry registry = SchemaRegistry.withDefaultDialect(
                SpecificationVersion.DRAFT_2020_12,
                builder -> builder.schemaRegistryConfig(
                        SchemaRegistryConfig.builder().formatAssertionsEnabled(true).build()));
        try (InputStream in = Files.newInputStream(file)) {
            return registry.getSchema(in);
        }
    }

    static JsonNode parseParams(String text) throws InvalidEvent {
        try {
            return JSON.readTree(text);
        } catch (JacksonException e) {
            throw new InvalidEvent("field 'params': --params is not JSON (" + e.getOriginalMessage() + ")");
        }
    }

    /** A new event: a fresh event_id, kept for every retry of this event by the idempotent producer. */
    static ObjectNode newEvent(Options options, JsonNode params) {
        ObjectNode event = JSON.createObjectNode();
        event.put("event_id", UUID.randomUUID().toString());
        event.put("event_type", EVENT_TYPE);
        event.put("schema_version", 1);
        event.put("occurred_at", options.occurredAt() != null
                ? options.occurredAt() : RFC3339_UTC.format(Instant.now()));
        event.put("request_id", "java-" + UUID.randomUUID());
        event.put("client_id", options.clientId());
        event.put("operation_type", options.operationType());
        event.put("provider", options.provider());
        event.put("model", options.model());
        event.set("params", params);
        return event;
    }

    static void validate(Schema schema, ObjectNode event) throws InvalidEvent {
        List<Error> errors = schema.validate(event);
        if (!errors.isEmpty()) {
            List<String> lines = new ArrayList<>();
            for (Error error : errors) {
                lines.add("field '" + fieldOf(error) + "': " + error.getMessage());
            }
            throw new InvalidEvent("the " + EVENT_TYPE + " event does not match " + SCHEMA_FILE
                    + ", nothing was sent: " + String.join("; ", lines));
        }
        int size = JSON.writeValueAsBytes(event).length;
        if (size > MAX_MESSAGE_BYTES) {
            throw new InvalidEvent("the event is " + size + " bytes, over the pipeline's limit of "
                    + MAX_MESSAGE_BYTES + "; send smaller params");
        }
    }

    /** The top-level field an error is about: its location, or the property it names. */
    static String fieldOf(Error error) {
        var location = error.getInstanceLocation();
        if (location != null && location.getNameCount() > 0) {
            return location.getName(0);
        }
        return error.getProperty() != null ? error.getProperty() : "(event)";
    }

    static void send(Options options, List<ObjectNode> events)
            throws ExecutionException, InterruptedException {
        Properties config = new Properties();
        config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, options.bootstrap());
        config.put(ProducerConfig.CLIENT_ID_CONFIG, "aipipe-java-example");
        config.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
        config.put(ProducerConfig.ACKS_CONFIG, "all");
        config.put(ProducerConfig.LINGER_MS_CONFIG, 5);
        config.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
        config.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, 60_000);
        try (KafkaProducer<String, byte[]> producer =
                new KafkaProducer<>(config, new StringSerializer(), new ByteArraySerializer())) {
            List<Future<RecordMetadata>> acks = new ArrayList<>();
            for (ObjectNode event : events) {
                ProducerRecord<String, byte[]> record = new ProducerRecord<>(
                        options.topic(), event.get("client_id").asString(), JSON.writeValueAsBytes(event));
                record.headers()
                        .add("request_id", event.get("request_id").asString().getBytes(StandardCharsets.UTF_8))
                        .add("event_type", EVENT_TYPE.getBytes(StandardCharsets.UTF_8));
                acks.add(producer.send(record));
            }
            producer.flush();
            for (int i = 0; i < events.size(); i++) {
                RecordMetadata meta = acks.get(i).get();
                ObjectNode line = JSON.createObjectNode();
                line.put("event_id", events.get(i).get("event_id").asString());
                line.put("request_id", events.get(i).get("request_id").asString());
                line.put("partition", meta.partition());
                line.put("offset", meta.offset());
                System.out.println(JSON.writeValueAsString(line));
            }
        }
    }
}
