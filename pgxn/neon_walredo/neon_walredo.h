/*
 * neon_walredo.h
 *	  Shared declarations of the neon_walredo extension.
 *
 * The extension has two halves:
 *	 neon_walredo.c  - module loading, GUCs, taking over the standalone
 *					   backend, the stdin/stdout message loop;
 *	 walredo_apply.c - what each message does to the buffer cache.
 */
#ifndef NEON_WALREDO_H
#define NEON_WALREDO_H

#include "storage/block.h"
#include "storage/relfilenode.h"

/* Size of the buffer tag on the wire: fork u8, spc/db/rel/blk u32 BE. */
#define WALREDO_TAG_SIZE	17

/* A target or referenced block, decoded from the wire. */
typedef struct WalRedoTag
{
	RelFileNode rnode;
	ForkNumber	forknum;
	BlockNumber blkno;
} WalRedoTag;

/* GUCs (neon_walredo.c) */
extern bool walredo_log_each_request;
extern bool walredo_verify_crc;

/* walredo_apply.c */
extern void walredo_apply_init(void);
extern void walredo_begin(const char *payload, int len);
extern void walredo_push_page(const char *payload, int len);
extern void walredo_apply_record(const char *payload, int len);
extern void walredo_get_page(const char *payload, int len, char *page_out);
extern void walredo_mask_page(const char *payload, int len, char *page_out);

#endif							/* NEON_WALREDO_H */
