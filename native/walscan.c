/*
 * Fast path of the WAL stream decoder (neon/postgres/waldecoder.py).
 *
 * wal_scan() walks records that lie wholly on one WAL page, and the short page headers between
 * them, validating exactly what the Python decoder validates. It stops, without consuming it,
 * at anything else: a record that continues on the next page, a segment's first page, an
 * XLOG_SWITCH record, missing input, or any check that fails. The Python decoder then handles
 * that item itself, so errors and rare cases have one implementation.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XLOG_BLCKSZ 8192
#define XLOG_PAGE_MAGIC 0xD110
#define XLP_FIRST_IS_CONTRECORD 0x0001
#define XLP_LONG_HEADER 0x0002
#define XLP_ALL_FLAGS 0x000F
#define SHORT_PHD 24
#define REC_HDR 24

typedef struct {
    uint64_t pos;       /* LSN of buf[off] */
    uint64_t prev;      /* start of the last record, the next xl_prev */
    uint32_t off;       /* index into buf */
    uint32_t page_room; /* bytes left on the current page; 0 at a page boundary */
    uint32_t tli;       /* highest page timeline seen */
    uint32_t prev_known;
} wal_scan_state;

static uint32_t crc_table[8][256];
static int crc_ready;
static int have_sse42;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
    crc_ready = 1;
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc_table[7][v & 0xFF] ^ crc_table[6][(v >> 8) & 0xFF] ^ crc_table[5][(v >> 16) & 0xFF] ^
              crc_table[4][(v >> 24) & 0xFF] ^ crc_table[3][(v >> 32) & 0xFF] ^
              crc_table[2][(v >> 40) & 0xFF] ^ crc_table[1][(v >> 48) & 0xFF] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

/* Un-finalised CRC-32C update (Postgres' COMP_CRC32C). */
static uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t n) {
#if defined(__x86_64__)
    if (have_sse42)
        return crc_hw(crc, p, n);
#endif
    return crc_sw(crc, p, n);
}

uint32_t wal_crc32c(const uint8_t *p, size_t n) {
    if (!crc_ready)
        crc_init();
    return crc_update(0xFFFFFFFFu, p, n) ^ 0xFFFFFFFFu;
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/*
 * Scan from st->off. For each record found, writes (start LSN, index in buf, tot_len, end LSN)
 * to out[4*i .. 4*i+3]. Returns the number of records; st is advanced past them.
 */
int wal_scan(const uint8_t *buf, uint32_t len, uint32_t seg_size, wal_scan_state *st, uint64_t *out,
             int max_out) {
    if (!crc_ready)
        crc_init();
    uint64_t pos = st->pos, prev = st->prev;
    uint32_t off = st->off, room = st->page_room, tli = st->tli;
    int prev_known = st->prev_known;
    int n = 0;
    while (n < max_out) {
        if (room == 0) {
            if (pos % seg_size == 0 || len - off < SHORT_PHD)
                break;
            const uint8_t *h = buf + off;
            uint16_t info = rd16(h + 2);
            uint32_t ptli = rd32(h + 4);
            if (rd16(h) != XLOG_PAGE_MAGIC || (info & ~XLP_ALL_FLAGS) ||
                (info & (XLP_LONG_HEADER | XLP_FIRST_IS_CONTRECORD)) || rd64(h + 8) != pos || ptli < tli)
                break;
            tli = ptli;
            off += SHORT_PHD;
            pos += SHORT_PHD;
            room = XLOG_BLCKSZ - SHORT_PHD;
            continue;
        }
        if (len - off < 4)
            break;
        const uint8_t *r = buf + off;
        uint32_t tot_len = rd32(r);
        uint32_t aligned = (tot_len + 7) & ~7u;
        if (tot_len < REC_HDR || aligned > room || len - off < aligned)
            break;
        uint64_t xl_prev = rd64(r + 8);
        uint8_t info = r[16], rmid = r[17];
        if (rmid > 21 && rmid < 128)
            break;
        if (prev_known ? xl_prev != prev : xl_prev >= pos)
            break;
        if (rmid == 0 && (info & 0xF0) == 0x40) /* XLOG_SWITCH: the Python decoder skips the segment */
            break;
        uint32_t crc = crc_update(0xFFFFFFFFu, r + REC_HDR, tot_len - REC_HDR);
        crc = crc_update(crc, r, 20) ^ 0xFFFFFFFFu;
        if (crc != rd32(r + 20))
            break;
        out[4 * n] = pos;
        out[4 * n + 1] = off;
        out[4 * n + 2] = tot_len;
        out[4 * n + 3] = pos + aligned;
        n++;
        prev = pos;
        prev_known = 1;
        pos += aligned;
        off += aligned;
        room -= aligned;
    }
    st->pos = pos;
    st->prev = prev;
    st->off = off;
    st->page_room = room;
    st->tli = tli;
    st->prev_known = prev_known;
    return n;
}
