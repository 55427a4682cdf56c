// Runs Debezium's PostgreSQL connector with the properties in the file given as the only
// argument (the outbox event router among its transforms) in Debezium's embedded engine, and
// prints what Kafka Connect would write to Kafka for each record, one JSON object per line:
// {"topic":…,"key":…,"value":…,"headers":[[name,value],…]}. Keys and values go through
// StringConverter and headers through SimpleHeaderConverter, as the documented connector
// configuration sets them. The first line is {"ready":true} once the connector's task runs
// (its replication slot exists); a failure prints {"error":…} and exits with status 1.
//
// Run by tests/debezium.rs with `java -cp '<debezium libs>/*' RouterProbe.java <file>`.

import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;
import io.debezium.embedded.Connect;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.Executors;
import org.apache.kafka.connect.header.Header;
import org.apache.kafka.connect.source.SourceRecord;
import org.apache.kafka.connect.storage.SimpleHeaderConverter;
import org.apache.kafka.connect.storage.StringConverter;

public class RouterProbe {
    private static final PrintStream OUT =
            new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        StringConverter keys = new StringConverter();
        keys.configure(Map.of(), true);
        StringConverter values = new StringConverter();
        values.configure(Map.of(), false);
        SimpleHeaderConverter headers = new SimpleHeaderConverter();
        headers.configure(Map.of());

        DebeziumEngine<RecordChangeEvent<SourceRecord>> engine = DebeziumEngine
                .create(ChangeEventFormat.of(Connect.class))
                .using(props)
                .using(new DebeziumEngine.ConnectorCallback() {
                    @Override
                    public void taskStarted() {
                        OUT.println("{\"ready\":true}");
                    }
                })
                .using((success, message, error) -> {
                    if (!success) {
                        OUT.println("{\"error\":" + json(message + (error == null ? "" : ": " + error)) + "}");
                        System.exit(1);
                    }
                })
                .notifying(event -> {
                    SourceRecord r = event.record();
                    String topic = r.topic();
                    StringBuilder line = new StringBuilder("{\"topic\":").append(json(topic));
                    byte[] key = keys.fromConnectData(topic, r.keySchema(), r.key());
                    byte[] value = values.fromConnectData(topic, r.valueSchema(), r.value());
                    line.append(",\"key\":").append(json(key == null ? null : new String(key, StandardCharsets.UTF_8)));
                    line.append(",\"value\":").append(json(value == null ? null : new String(value, StandardCharsets.UTF_8)));
                    line.append(",\"headers\":[");
                    boolean first = true;
                    for (Header h : r.headers()) {
                        byte[] bytes = headers.fromConnectHeader(topic, h.key(), h.schema(), h.value());
                        line.append(first ? "" : ",").append('[').append(json(h.key())).append(',')
                                .append(json(bytes == null ? null : new String(bytes, StandardCharsets.UTF_8))).append(']');
                        first = false;
                    }
                    OUT.println(line.append("]}"));
                })
                .build();
        Executors.newSingleThreadExecutor().execute(engine);
    }

    private static String json(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> b.append("\\\"");
                case '\\' -> b.append("\\\\");
                default -> {
                    if (c < 0x20) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
                }
            }
        }
        return b.append('"').toString();
    }
}
