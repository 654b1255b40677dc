"""lora summary: what a registered PEFT LoRA version adapts (rank, alpha, targets, layers, only_ffn).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 03:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('expert_versions') as batch:
        batch.add_column(sa.Column('lora', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('expert_versions') as batch:
        batch.drop_column('lora')
