/* What readers and writers of files share: messages that always name the file, and the
 * temporary files of atomic writes (made, found through symbolic links, and cleaned up after
 * writers that were killed). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/io_internal.h"
#include "tensor/tensor_internal.h"

void qkv__name_file_in_error(const char *op, const char *path, bool had_error) {
    const char *e = qkv_error();
    if (had_error || !e || strstr(e, path)) return;
    /* The message is at most 1024 bytes: a copy on the stack, since memory may be short. */
    char copy[1024];
    snprintf(copy, sizeof copy, "%s", e);
    qkv_clear_error();
    qkv_set_error("%s: %s: %s", op, path, copy);
}

/* ---- Temporary files of atomic writes ---------------------------------------------------- */

/* A temporary file of a writer that is no process any more is removed once it has not changed
 * for this long. */
#define STALE_SECONDS 60

char *qkv__resolve_links(const char *op, const char *path, size_t *size) {
    size_t cap = strlen(path) + 1;
    char *p = qkv__alloc(cap);
    if (!p) return NULL;
    memcpy(p, path, cap);
    for (int hops = 0;; hops++) {
        struct stat st;
        if (lstat(p, &st) != 0 || !S_ISLNK(st.st_mode)) break;
        char target[PATH_MAX];
        ssize_t n = hops < 40 ? readlink(p, target, sizeof target - 1) : -1;
        if (n < 0) {
            qkv_set_error("%s: %s: %s", op, path, strerror(hops < 40 ? errno : ELOOP));
            qkv__free(p, cap);
            return NULL;
        }
        target[n] = '\0';
        /* A relative target is relative to the link's directory. */
        const char *slash = strrchr(p, '/');
        size_t dir_len = target[0] != '/' && slash ? (size_t)(slash - p) + 1 : 0;
        size_t need = dir_len + (size_t)n + 1;
        char *next = qkv__alloc(need);
        if (!next) {
            qkv__free(p, cap);
            return NULL;
        }
        memcpy(next, p, dir_len);
        memcpy(next + dir_len, target, (size_t)n + 1);
        qkv__free(p, cap);
        p = next;
        cap = need;
    }
    *size = cap;
    return p;
}

int qkv__open_temporary(const char *path, char *tmp, size_t size) {
    static unsigned counter;
    struct stat old;
    bool replaces = stat(path, &old) == 0 && S_ISREG(old.st_mode);
    const char *slash = strrchr(path, '/');
    int dir_len = slash ? (int)(slash - path) + 1 : 0;
    bool short_name = false;
    for (int attempt = 0; attempt < 100; attempt++) {
        unsigned n = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
        if (short_name)
            snprintf(tmp, size, "%.*s.qkv-%ld-%u.tmp", dir_len, path, (long)getpid(), n);
        else
            snprintf(tmp, size, "%s.tmp-%ld-%u", path, (long)getpid(), n);
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) {
            if (replaces) fchmod(fd, old.st_mode & 07777);
            return fd;
        }
        if (errno == ENAMETOOLONG && !short_name) short_name = true;
        else if (errno != EEXIST) return -1;
    }
    return -1;
}

/* Digits from s up to (not including) end, as a number; false if none or not all digits. */
static bool digits_between(const char *s, const char *end, unsigned long long *v) {
    if (s >= end || end - s > 19) return false;
    *v = 0;
    for (; s < end; s++) {
        if (*s < '0' || *s > '9') return false;
        *v = *v * 10 + (unsigned long long)(*s - '0');
    }
    return true;
}

/* The writer's pid if name is one of qkv__open_temporary's names ("<name>.tmp-<pid>-<n>" or
 * ".qkv-<pid>-<n>.tmp"), else 0. */
static pid_t temporary_pid(const char *name) {
    size_t len = strlen(name);
    const char *start = NULL, *end = name + len;
    if (!strncmp(name, ".qkv-", 5) && len > 9 && !strcmp(name + len - 4, ".tmp")) {
        start = name + 5;
        end -= 4;
    } else {
        for (const char *p = strstr(name, ".tmp-"); p; p = strstr(p + 1, ".tmp-"))
            if (p > name) start = p + 5; /* the last one */
    }
    const char *dash = start ? memchr(start, '-', (size_t)(end - start)) : NULL;
    unsigned long long pid, n;
    if (!dash || !digits_between(start, dash, &pid) || !digits_between(dash + 1, end, &n) ||
        pid == 0 || pid > INT32_MAX)
        return 0;
    return (pid_t)pid;
}

void qkv__remove_stale_temporaries(const char *path) {
    const char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path) + 1 : 0;
    char dirname[PATH_MAX];
    if (dir_len >= sizeof dirname) return;
    snprintf(dirname, sizeof dirname, "%.*s", (int)dir_len, dir_len ? path : "./");
    DIR *d = opendir(dirname);
    if (!d) return;
    time_t now = time(NULL);
    for (struct dirent *e; (e = readdir(d));) {
        pid_t pid = temporary_pid(e->d_name);
        if (!pid || pid == getpid()) continue;
        /* Only a writer that is gone: the pid is no process here, and the file has not
         * changed for a while (a writer in another pid namespace or on another host sharing
         * the directory writes continuously until it renames). */
        if (kill(pid, 0) == 0 || errno != ESRCH) continue;
        char p[PATH_MAX];
        struct stat st;
        if ((size_t)snprintf(p, sizeof p, "%s%s", dirname, e->d_name) >= sizeof p ||
            lstat(p, &st) != 0 || !S_ISREG(st.st_mode) || now - st.st_mtime < STALE_SECONDS)
            continue;
        unlink(p);
    }
    closedir(d);
}
