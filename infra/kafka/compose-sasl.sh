#!/bin/sh
# The docker-compose Kafka with SASL/SCRAM and ACLs (docker-compose.sasl.yml): the same
# settings as infra/kafka/sasl.properties.template gives the local broker of `aipipe up`.
# Writes server.properties (0600: it holds the admin password), creates the SCRAM users
# when the data dir is formatted (the first start of a fresh volume), then runs Kafka.
set -eu
: "${CLUSTER_ID:?}" "${KAFKA_ADMIN_PASSWORD:?}" "${KAFKA_UPSTREAM_PASSWORD:?}"
: "${KAFKA_WORKERS_PASSWORD:?}" "${KAFKA_ANALYSTS_PASSWORD:?}"
umask 077
props=/tmp/server.properties
scram='org.apache.kafka.common.security.scram.ScramLoginModule required'
cat > "$props" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@kafka:9093
controller.listener.names=CONTROLLER
# the other containers at kafka:9092, the host at localhost:29092: both sign in with SCRAM
listeners=SASL_PLAINTEXT://:9092,CONTROLLER://:9093,HOST://:29092
advertised.listeners=SASL_PLAINTEXT://kafka:9092,HOST://localhost:29092
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT,HOST:SASL_PLAINTEXT
inter.broker.listener.name=SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=$scram username="admin" password="$KAFKA_ADMIN_PASSWORD";
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=$scram username="admin" password="$KAFKA_ADMIN_PASSWORD";
listener.name.host.scram-sha-512.sasl.jaas.config=$scram;
listener.name.host.scram-sha-256.sasl.jaas.config=$scram;
# a KRaft controller cannot check SCRAM: the broker-controller link uses PLAIN, admin only
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$KAFKA_ADMIN_PASSWORD" user_admin="$KAFKA_ADMIN_PASSWORD";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin
allow.everyone.if.no.acl.found=false
log.dirs=/var/lib/kafka/data
auto.create.topics.enable=false
num.partitions=1
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
PROPS
cat > /tmp/admin.properties <<PROPS
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=$scram username="admin" password="$KAFKA_ADMIN_PASSWORD";
PROPS
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  set --
  for user in admin upstream workers analysts; do
    eval "password=\$KAFKA_$(echo "$user" | tr a-z A-Z)_PASSWORD"
    for mechanism in SCRAM-SHA-512 SCRAM-SHA-256; do
      set -- "$@" --add-scram "$mechanism=[name=$user,password=$password]"
    done
  done
  # its output lists the SCRAM users' salted keys: not for the container's log
  /opt/kafka/bin/kafka-storage.sh format -t "$CLUSTER_ID" -c "$props" "$@" > /dev/null
fi
exec /opt/kafka/bin/kafka-server-start.sh "$props"
