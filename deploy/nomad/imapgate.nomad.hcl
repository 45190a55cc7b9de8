# imapgate on Nomad: two instances, each on its own client node, Consul
# routing, a rolling update that waits for /readyz. Nomad registers the
# service in Consul itself, so imapgate's own registration is off here.
#
#   nomad job run deploy/nomad/imapgate.nomad.hcl

job "imapgate" {
  datacenters = ["dc1"]
  type        = "service"

  update {
    max_parallel     = 1
    health_check     = "checks"
    min_healthy_time = "10s"
    healthy_deadline = "2m"
    auto_revert      = true
  }

  group "imapgate" {
    count = 2

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      # The image listens on 1993/1143 (non-root); the host on 993/143.
      port "imaps" {
        static = 993
        to     = 1993
      }
      port "imap" {
        static = 143
        to     = 1143
      }
      port "http" { to = 8080 }
    }

    service {
      name = "imapgate"
      port = "imaps"
      tags = ["imaps"]
      check {
        type     = "http"
        port     = "http"
        path     = "/readyz"
        interval = "5s"
        timeout  = "2s"
      }
    }

    service {
      name = "imapgate"
      port = "imap"
      tags = ["imap"]
    }

    service {
      name = "imapgate-metrics"
      port = "http"
      tags = ["prometheus"]
    }

    task "imapgate" {
      driver = "docker"

      config {
        image = "imapgate:latest"
        ports = ["imaps", "imap", "http"]
        args  = ["-config", "/local/imapgate.toml"]
      }

      # Drain: drain_window + grace below, plus a margin.
      kill_signal  = "SIGTERM"
      kill_timeout = "45s"

      env {
        CONSUL_HTTP_ADDR = "${attr.unique.network.ip-address}:8500"
      }

      template {
        destination = "local/imapgate.toml"
        # A changed template (or Consul key) reloads imapgate without a
        # restart.
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-TOML
          [log]
          format = "json"

          [[listen]]
          addr = "[::]:1993"
          mode = "tls"
          name = "imaps"

          [[listen]]
          addr = "[::]:1143"
          mode = "starttls"
          name = "imap"

          [[tls.certificates]]
          cert = "/secrets/fullchain.pem"
          key  = "/secrets/privkey.pem"

          [routing]
          router = "consul"

          [consul]
          service = "imap"
          prefix  = "imapgate"

          [http]
          addr        = "[::]:8080"
          admin_token = "{{ with nomadVar "nomad/jobs/imapgate" }}{{ .admin_token }}{{ end }}"

          [shutdown]
          drain_window = "15s"
          grace        = "20s"
          TOML
      }

      template {
        destination = "secrets/fullchain.pem"
        change_mode = "signal"
        change_signal = "SIGHUP"
        data        = "{{ with nomadVar \"nomad/jobs/imapgate\" }}{{ .fullchain }}{{ end }}"
      }

      template {
        destination = "secrets/privkey.pem"
        change_mode = "signal"
        change_signal = "SIGHUP"
        perms       = "0600"
        data        = "{{ with nomadVar \"nomad/jobs/imapgate\" }}{{ .privkey }}{{ end }}"
      }

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }
}
