/* One federated client round from C: the app hands over its training text, says when the
 * device may train, and receives the library's log lines.
 *
 *   client COORDINATOR CA CERT KEY STATE_DIR BASE DATA_FILE [MAX_TRAIN_SECS]
 *
 * Build and run it with scripts/c-example.sh. Exit code 0 when the federation finished. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedlora.h"

struct app {
    FILE *data;
    unsigned long eligibility_checks;
};

/* The training text, read from a file here; an app may read it from its own store. */
static intptr_t read_data(void *user, uint8_t *buffer, size_t capacity) {
    struct app *app = user;
    size_t n = fread(buffer, 1, capacity, app->data);
    if (n == 0 && ferror(app->data)) {
        return -1;
    }
    return (intptr_t)n;
}

/* A real device would check its power, temperature or user activity here. */
static FedloraEligibility eligible(void *user) {
    struct app *app = user;
    __atomic_add_fetch(&app->eligibility_checks, 1, __ATOMIC_RELAXED);
    return FEDLORA_ELIGIBILITY_ELIGIBLE;
}

static void log_line(void *user, int32_t level, const char *line) {
    (void)user;
    fprintf(stderr, "[fedlora %d] %s\n", level, line);
}

int main(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: %s COORDINATOR CA CERT KEY STATE_DIR BASE DATA_FILE [MAX_TRAIN_SECS]\n",
                argv[0]);
        return 2;
    }
    struct app app = {0};
    app.data = fopen(argv[7], "rb");
    if (!app.data) {
        perror(argv[7]);
        return 2;
    }
    FedloraConfig config = {0};
    config.coordinator = argv[1];
    config.ca = argv[2];
    config.cert = argv[3];
    config.key = argv[4];
    config.state_dir = argv[5];
    config.base = argv[6];
    config.max_threads = 2;
    config.max_train_secs = argc > 8 ? atof(argv[8]) : 0.0;

    FedloraCallbacks callbacks = {0};
    callbacks.user = &app;
    callbacks.read_data = read_data;
    callbacks.eligible = eligible;
    callbacks.log = log_line;

    char error[512];
    printf("fedlora %s\n", fedlora_version());
    FedloraClient *client = fedlora_client_create(&config, &callbacks, error, sizeof error);
    fclose(app.data);
    if (!client) {
        fprintf(stderr, "create: %s\n", error);
        return 2;
    }
    FedloraReport report;
    FedloraStatus status = fedlora_client_run(client, &report);
    if (status != FEDLORA_STATUS_OK) {
        const char *why = fedlora_client_last_error(client);
        fprintf(stderr, "run: status %d: %s\n", (int)status, why ? why : "");
        fedlora_client_free(client);
        return 1;
    }
    printf("uploaded %u rounds, declined %u, final version %lld, %llu bytes up, %llu down, "
           "%lu eligibility checks\n",
           report.rounds_uploaded, report.rounds_declined, (long long)report.final_version,
           (unsigned long long)report.bytes_up, (unsigned long long)report.bytes_down,
           app.eligibility_checks);
    fedlora_client_free(client);
    return 0;
}
